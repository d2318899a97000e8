"""What is measured: the optimizers, the implementations timed against each
other, the precisions, and the byte budget that turns a step time into GB/s.

These tables are the single source of the names: the command line's choices
and ``--help`` are generated from them.
"""

from __future__ import annotations

import dataclasses
import inspect

import torch


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    class_name: str  # same name in torch.optim and fused_optim
    kwargs: dict  # hyperparameters given to every implementation
    state_tensors: int  # state tensors per param, each read and written once per step
    # "module:Class" of the published implementation timed as the
    # "reference" peer, for an optimizer torch.optim lacks
    reference: str | None = None
    # The plot's name for it, where two specs share a class (default: class_name)
    label: str | None = None
    # In 'all' (and the default run): the fused optimizers. The unfused
    # cautious variants run by name only, so that the default CPU run and
    # the GPU check's time boxes measure the fused steps.
    in_all: bool = True

    @property
    def torch_has_fused(self) -> bool:
        """Whether torch.optim has the class and its constructor takes
        ``fused`` (read from the signature)."""
        cls = getattr(torch.optim, self.class_name, None)
        return cls is not None and "fused" in inspect.signature(cls).parameters

    def describe(self) -> str:
        return f"{self.class_name}({', '.join(f'{k}={v}' for k, v in self.kwargs.items())})"


OPTIMIZERS = {
    # fp32 byte budgets, from bytes_per_element below:
    # SGD with momentum, Adagrad, RMSprop 20; Adam, AdamW, RAdam, NAdam 28.
    "sgd": OptimizerSpec("SGD", {"lr": 1e-3, "momentum": 0.9}, 1),
    "adagrad": OptimizerSpec("Adagrad", {"lr": 1e-2}, 1),
    # No momentum, not centered: square_avg only (centered adds grad_avg,
    # momentum adds momentum_buffer).
    "rmsprop": OptimizerSpec("RMSprop", {"lr": 1e-3}, 1),
    "adam": OptimizerSpec("Adam", {"lr": 1e-3}, 2),
    "adamw": OptimizerSpec("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, 2),
    "radam": OptimizerSpec("RAdam", {"lr": 1e-3}, 2),
    # (mu_product is a per-param scalar, not a per-element byte)
    "nadam": OptimizerSpec("NAdam", {"lr": 2e-3}, 2),
    # torch.optim has no Lion: its peer is the reference implementation,
    # lion-pytorch (installed pinned by scripts/bootstrap.sh), whose default
    # for-loop step is also what its README recommends on the CPU.
    "lion": OptimizerSpec("Lion", {"lr": 1e-4, "weight_decay": 1e-2}, 1,
                          reference="lion_pytorch:Lion"),
    # torch.optim has no LARS: its peer is timm's Lars (timm installed
    # pinned, without dependencies, by scripts/bootstrap.sh; only its
    # timm/optim/lars.py and the helpers it imports are loaded), in its
    # default implementation (timm 1.0.31: foreach, multi-tensor). weight_decay
    # != 0, so every tensor is adapted (two norms per tensor, then SGD).
    # The byte budget is the update's (SGD with momentum, 20 B fp32); the
    # norms' pass reads each param and grad once more (8 B), not counted.
    "lars": OptimizerSpec("Lars", {"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-4}, 1,
                          reference="timm.optim.lars:Lars"),
    # torch.optim has no LAMB: its peer is timm's Lamb (as Lars: its file
    # timm/optim/lamb.py and its helpers), foreach by default. timm's defaults
    # (weight_decay 0.01: every tensor adapted; max_grad_norm 1.0: clipped
    # by the global norm, a norm per gradient then their norm). The byte
    # budget is the update's (Adam's 28 B fp32); the measuring pass reads
    # param, grad and both moments once more (16 B) and the clipping's norm
    # the grads once more (4 B), not counted.
    "lamb": OptimizerSpec("Lamb", {"lr": 1e-3}, 2, reference="timm.optim.lamb:Lamb"),
    # timm's cautious variants (caution=True): not fused, ours stepped by
    # the plain per-tensor code (Note [cautious groups] in
    # fused_optim/_reference.py), against timm's own classes in their
    # default implementation. The byte budgets are the fused updates'.
    "clion": OptimizerSpec("Lion", {"lr": 1e-4, "weight_decay": 1e-2, "caution": True}, 1,
                           reference="timm.optim.lion:Lion", label="Lion (cautious)",
                           in_all=False),
    "clamb": OptimizerSpec("Lamb", {"lr": 1e-3, "caution": True}, 2,
                           reference="timm.optim.lamb:Lamb", label="Lamb (cautious)",
                           in_all=False),
}
# The optimizers of 'all' and of the default run.
ALL_OPTIMIZERS = [name for name, spec in OPTIMIZERS.items() if spec.in_all]

# The implementations, ours first: every ratio is a peer's time over ours.
IMPL_DESCRIPTIONS = {
    "fused_optim": "this package (always timed: the ratios are relative to it)",
    "torch-fused": "torch.optim with fused=True (torch has none for RMSprop)",
    "torch-foreach": "torch.optim with foreach=True",
    "torch-forloop": "torch.optim with foreach=False, torch's CPU default",
    "deepspeed": "DeepSpeedCPUAdam: Adam and AdamW, CPU, fp32, when deepspeed is installed",
    "reference": "the published implementation of an optimizer torch.optim lacks (Lion: "
                 "lion-pytorch; Lars, Lamb and the cautious ones: timm), when installed",
}
IMPLS = tuple(IMPL_DESCRIPTIONS)
OURS = IMPLS[0]
PEERS = IMPLS[1:]

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}

# The global norm the clipped precisions clip to: below the benchmark's
# gradient norms, so every step clips (and, once torch's in-place clipping
# has scaled its gradients to this norm, their size stays put).
CLIP_NORM = 1.0


@dataclasses.dataclass(frozen=True)
class Precision:
    """Param dtype and fused_optim's mixed-precision options for one run.

    The torch.optim peers run the same param dtype without the options
    torch.optim lacks (master weights, a state dtype other than the param's,
    stochastic rounding): see ``torch_equivalent``.
    """

    name: str
    param_dtype: torch.dtype
    master_weights: bool = False
    state_dtype: torch.dtype | None = None  # None: the param dtype (float32 with master weights)
    stochastic_rounding: bool = False
    # Under GradScaler: ours is built with fused=True where the class takes
    # it, and with master weights it unscales in the step too (the gradient
    # unscaled in registers and written back); the others get GradScaler's
    # own pass (peers.amp_step).
    amp: bool = False
    # Clipping by the global gradient norm to CLIP_NORM every step: ours
    # with max_grad_norm (a norm pass, then the step scaling in registers);
    # the peers with torch.nn.utils.clip_grad_norm_ (foreach) before their
    # step, as a user of torch.optim clips.
    clip: bool = False

    @property
    def resolved_state_dtype(self) -> torch.dtype:
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if self.master_weights else self.param_dtype

    def ours_kwargs(self) -> dict:
        """Constructor keywords of fused_optim's classes for this precision."""
        kwargs = {}
        if self.master_weights:
            kwargs["master_weights"] = True
        if self.state_dtype is not None:
            kwargs["state_dtype"] = self.state_dtype
        if self.stochastic_rounding:
            kwargs["stochastic_rounding"] = True
        if self.clip:
            kwargs["max_grad_norm"] = CLIP_NORM
        return kwargs

    def torch_equivalent(self) -> "Precision":
        """What torch.optim runs for this precision: same params (and AMP),
        state in the param dtype, no master weights, round-to-nearest."""
        return Precision(f"torch {DTYPE_NAMES[self.param_dtype]}", self.param_dtype, amp=self.amp,
                         clip=self.clip)

    @property
    def torch_has_fused(self) -> bool:
        """Whether torch.optim has the class and its constructor takes
        ``fused`` (read from the signature)."""
        cls = getattr(torch.optim, self.class_name, None)
        return cls is not None and "fused" in inspect.signature(cls).parameters

    def describe(self) -> str:
        parts = [f"{DTYPE_NAMES[self.param_dtype]} params"]
        if self.master_weights:
            parts.append("fp32 master")
        parts.append(f"{DTYPE_NAMES[self.resolved_state_dtype]} state")
        if self.stochastic_rounding:
            parts.append("stochastic rounding")
        if self.amp:
            parts.append("AMP")
        if self.clip:
            parts.append(f"clipped to norm {CLIP_NORM:g}")
        return ", ".join(parts)


PRECISIONS = {
    p.name: p
    for p in (
        Precision("fp32", torch.float32),
        Precision("bf16", torch.bfloat16),
        Precision("fp32-state-bf16", torch.float32, state_dtype=torch.bfloat16),
        Precision("bf16-state-fp32", torch.bfloat16, state_dtype=torch.float32),
        Precision("bf16-master", torch.bfloat16, master_weights=True),
        Precision("bf16-master-state-bf16", torch.bfloat16, master_weights=True,
                  state_dtype=torch.bfloat16),
        Precision("bf16-sr", torch.bfloat16, stochastic_rounding=True),
        Precision("fp32-amp", torch.float32, amp=True),
        Precision("bf16-master-amp", torch.bfloat16, master_weights=True, amp=True),
        Precision("fp32-clip", torch.float32, clip=True),
        Precision("bf16-clip", torch.bfloat16, clip=True),
    )
}
# Named sets for --precisions.
PRECISION_SETS = {
    # bf16 params with every option, with fp32 and plain bf16 for reference.
    "mixed": ["fp32", "bf16", "bf16-master", "bf16-master-state-bf16", "bf16-state-fp32",
              "bf16-sr", "fp32-state-bf16"],
    "amp": ["fp32-amp", "bf16-master-amp"],
    "clip": ["fp32-clip", "bf16-clip"],
}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_element(spec: OptimizerSpec, precision: Precision) -> int:
    """Bytes one ideal single pass moves per param element.

    The gradient (in the param dtype) is read, and written back once more when
    the step unscales it (AMP); clipping reads it once more (the norm pass:
    the least a clipped step can move). Each state tensor is read and written. The
    param is read and written; with master weights the fp32 master is read
    and written instead and the param is only written.
    Adam fp32: 4 + (4 + 4) + 2 * (4 + 4) = 28; bf16 params with fp32 master
    and fp32 state: 2 + (4 + 4 + 2) + 2 * (4 + 4) = 28; bf16: 14.
    """
    param = element_size(precision.param_dtype)
    grad = param * (1 + int(precision.amp) + int(precision.clip))
    if precision.master_weights:
        weights = 2 * element_size(torch.float32) + param
    else:
        weights = 2 * param
    state = 2 * spec.state_tensors * element_size(precision.resolved_state_dtype)
    return grad + weights + state


def memory_per_element(spec: OptimizerSpec, precision: Precision) -> int:
    """Bytes held per param element: param, grad, master copy, state."""
    param = element_size(precision.param_dtype)
    master = element_size(torch.float32) if precision.master_weights else 0
    return 2 * param + master + spec.state_tensors * element_size(precision.resolved_state_dtype)
