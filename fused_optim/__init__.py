"""fused_optim: fused optimizer kernels for PyTorch, drop-in for torch.optim.

    from fused_optim import AdamW          # was: from torch.optim import AdamW
    opt = AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
"""

import torch  # noqa: F401  (loads libtorch before our extension)

from fused_optim import _C  # noqa: F401  (registers the torch.ops.fused_optim ops)
from fused_optim import _dtensor
from fused_optim._clip import clip_grad_norm_
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
    "clip_grad_norm_",
    "cuda_built",
]
__version__ = "0.1.0"

_dtensor.register_when_imported()  # torch.ops.fused_optim.* on DTensors (FSDP2, TP)
