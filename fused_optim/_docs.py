"""Docstring text shared by the optimizers, written once."""

PARAMS = """params (iterable): iterable of parameters or named parameters to
            optimize, or of dicts defining parameter groups (each with its own
            hyperparameters; all groups are updated by one fused call)."""

MAXIMIZE = """maximize (bool, optional): maximize the objective with respect to
            the params instead of minimizing it (default: False)."""

_KEYWORD_DOCS = {
    "foreach": """foreach (bool, optional): with ``fused`` None or True, accepted and
            the step is our fused one, which already updates all tensors in
            one pass (a multi-tensor step, which is what foreach asks for;
            the arguments are checked as torch checks them with
            foreach=True). With
            ``fused=False`` or ``differentiable=True`` it chooses torch's
            implementation, as in torch.optim (default: None).""",
    "fused": """fused (bool, optional): None or True: our fused step (with
            None, a group holding a param on a device this build has no
            kernels for, such as meta or mps, is stepped as torch.optim's
            default steps it, by torch's code, with a warning except on
            meta; with True, or our precision options, such a step raises
            torch's error for a fused step there). False:
            the group is stepped by torch.optim's own unfused implementation
            (single-tensor or foreach, chosen by ``foreach`` as torch
            chooses), with the same state, so results are torch's
            ``fused=False`` results exactly; our precision options are then
            unavailable. True with ``foreach=True`` or
            ``differentiable=True`` raises RuntimeError, as torch
            (default: None).""",
    "capturable": """capturable (bool, optional): for CUDA graph capture. On CUDA our
            step does not sync with the host whatever this flag (step
            counters live on the device, AMP's skip is decided on the
            device; only a step that makes state under AMP reads the inf
            flag, and capture follows warm-up steps); give
            ``lr`` as a CUDA tensor, updated in place by schedulers, for a
            captured CUDA graph to see learning-rate changes (float
            hyperparameters are baked into a capture). On CPU params it
            changes nothing, as for torch's fused step (default: False).""",
    "differentiable": """differentiable (bool, optional): True makes the step
            differentiable (autograd records it, e.g. for meta-learning): the
            group is stepped by torch.optim's own implementation, which is
            what records it, with the same state and results; our precision
            options are then unavailable (default: False).""",
}


PRECISION = """master_weights (bool, optional): keep a float32 copy of each
            float16/bfloat16 param in ``state["master_param"]``; the kernel
            updates it and writes the param rounded to nearest, in the same
            pass. Saved and loaded with the state; loading a torch.optim
            checkpoint makes it from the params. The master copy is the truth:
            write to it (or load a state dict), not to the param, to change
            weights. No effect on float32/float64 params (default: False).
        state_dtype (torch.dtype, optional): storage dtype of the optimizer
            state (moments, momentum buffers, sums): torch.float32 or
            torch.bfloat16; math still runs in float32. None: the param dtype,
            or float32 with master_weights. float64 and complex params keep
            their own dtype (another raises ValueError) (default: None).
        stochastic_rounding (bool, optional): write bfloat16 params (without
            master weights) with stochastic rounding, unbiased, so that
            updates below half a bf16 ulp still add up; the random bits are a
            hash of (step, tensor, element): deterministic, the same on CPU
            and CUDA. float16 params raise ValueError; float32/float64 params
            are unaffected (default: False).
        max_grad_norm (float, optional): clip the gradients by their global
            L2 norm, as ``torch.nn.utils.clip_grad_norm_(params, max_norm)``
            before the step: the step measures the norm of ALL this
            optimizer's gradients (every group, device and, under FSDP2,
            rank; unscaled under AMP) in one reduction pass, and the update
            multiplies each gradient of this group by ``min(1, max_grad_norm
            / (norm + 1e-6))`` in registers, without writing it: gradients
            are read twice per step instead of three times. Per group, saved
            in ``state_dict`` when set. The norm is ``optimizer.grad_norm``;
            ``inf`` measures it without clipping. Sparse gradients raise
            (default: None: no clipping)."""


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
    checkpoints move between the two in both directions (our extra state,
    ``master_param``, under its own key). Kernels exist for CPU params and,
    in a CUDA build, CUDA params (``fused_optim.cuda_built()``).

    AMP: who unscales under ``torch.amp.GradScaler`` follows torch.optim's
    rule (``_step_supports_amp_scaling``). Built with ``fused=True`` where
    the class takes it, or with ``master_weights=True`` (to the constructor
    or to a param group), the step takes
    GradScaler's scale and inf flag: the kernel divides the gradients by the
    scale in registers, writes them back unscaled, and skips the whole step,
    step counters included, when an inf/NaN was found (the gradients are
    then left as they were, scaled, as by torch's ``fused=True``, and state
    the step made is taken back): no extra pass and, on CUDA, no host sync
    but in a step that makes state. Otherwise GradScaler unscales in a pass
    of its own and skips calling step(), as for torch.optim's default.
"""


# timm's caution=True, in Lion's and Lamb's docstrings (Note [cautious
# groups] in _reference.py).
CAUTION = r"""caution (bool, optional): timm's cautious variant (Liang et al.,
            "Cautious Optimizers", 2024, https://arxiv.org/abs/2411.16085):
            :math:`u \leftarrow u \odot \mathbb{1}[u \odot g > 0] /
            \max(\mathrm{mean}(\mathbb{1}[u \odot g > 0]), 10^{-3})`,
            the mean over the tensor, before any decay is added. Not fused:
            a group with it is stepped by the plain per-tensor
            implementation (``fused_optim._reference``), in the param's dtype
            as timm's, one tensor at a time (torch ops); the precision
            options are refused there (default: False)."""
