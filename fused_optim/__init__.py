"""fused_optim: fused optimizer kernels for PyTorch, drop-in for torch.optim."""
import torch  # noqa: F401  (loads libtorch before our extension)

from fused_optim import _C  # noqa: F401  (registers torch.ops.fused_optim.*)
