"""fused_optim: fused optimizer kernels for PyTorch, drop-in for torch.optim.

    from fused_optim import AdamW          # was: from torch.optim import AdamW
    opt = AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
"""

import sys

import torch  # (loads libtorch before our extension)

from fused_optim import _C  # noqa: F401  (registers the torch.ops.fused_optim ops)
from fused_optim import _dtensor, _functional
from fused_optim._clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from fused_optim._build import cuda_built
from fused_optim.adagrad import Adagrad
from fused_optim.adam import Adam, AdamW
from fused_optim.lamb import Lamb
from fused_optim.lars import Lars
from fused_optim.lion import Lion
from fused_optim.nadam import NAdam
from fused_optim.radam import RAdam
from fused_optim.rmsprop import RMSprop
from fused_optim.sgd import SGD

__all__ = [
    "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "RAdam", "NAdam", "Lion", "Lars", "Lamb",
    "clip_grad_norm_", "clip_grads_with_norm_", "get_total_norm",
    "cuda_built",
]
__version__ = "0.1.0"

_dtensor.register_when_imported()  # torch.ops.fused_optim.* on DTensors (FSDP2, TP)
# our classes in torch.distributed's table of functional twins (DDP's
# overlapped optimizer, ZeRO's overlap_with_ddp)
_functional.register_when_imported([c for c in map(globals().get, __all__) if isinstance(c, type)])

# Note [the rest of torch.optim]
# `import torch.optim as optim` is the idiom, so `import fused_optim as
# optim` must keep the lines that follow it working: what is not fused here
# (the schedulers, SWA, Optimizer, torch's other optimizers: Adadelta,
# Adamax, LBFGS, ...) is torch.optim's own object under the same name, not a
# copy, so isinstance checks and `from fused_optim.lr_scheduler import
# StepLR` behave as with torch.optim. fused_optim.Adadelta IS
# torch.optim.Adadelta: only the classes in __all__ are ours.
_FROM_TORCH_OPTIM = frozenset(torch.optim.__all__) - frozenset(__all__)
for _submodule in ("lr_scheduler", "swa_utils"):
    sys.modules[f"{__name__}.{_submodule}"] = getattr(torch.optim, _submodule)
del _submodule


def __getattr__(name):
    if name in _FROM_TORCH_OPTIM:
        return getattr(torch.optim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_FROM_TORCH_OPTIM})
