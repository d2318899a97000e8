"""Docstring text shared by the optimizers, written once."""

PARAMS = """params (iterable): iterable of parameters or named parameters to
            optimize, or of dicts defining parameter groups (each with its own
            hyperparameters; all groups are updated by one fused call)."""

MAXIMIZE = """maximize (bool, optional): maximize the objective with respect to
            the params instead of minimizing it (default: False)."""

_KEYWORD_DOCS = {
    "foreach": """foreach (bool, optional): accepted for compatibility with
            torch.optim; the fused step already updates all tensors in one
            pass, whatever its value (default: None).""",
    "fused": """fused (bool, optional): None or True (the step is always fused);
            False raises ValueError, since it asks for torch's unfused
            implementation (default: None).""",
    "capturable": """capturable (bool, optional): must be False; CUDA graph capture of the
            step is not supported yet (default: False).""",
    "differentiable": """differentiable (bool, optional): must be False; the fused step is not
            recorded by autograd (default: False).""",
}


def implementation(*keywords: str) -> str:
    """The Args entries of the torch.optim implementation keywords a class
    takes (its signature's, in its order)."""
    return "\n        ".join(_KEYWORD_DOCS[k] for k in keywords)


FUSED_NOTE = """
    How it runs: the tensors of all param groups are grouped by (device,
    dtype, mode flags) and each such bucket is updated by ONE call of
    ``torch.ops.fused_optim.{op}``, which reads every tensor and its state
    once and writes them once, with each tensor's own group's
    hyperparameters (read every step, so LR schedulers work). Math runs in
    fp32 for fp16/bf16/fp32 params and in fp64 for fp64 params; low-precision
    params are rounded once per step, not after every sub-operation as in
    torch.optim. The state and ``state_dict`` layout is torch.optim's, so
    checkpoints move between the two in both directions.
"""
