"""What this build of the extension contains, and the errors for what it
does not."""

from __future__ import annotations

import torch

try:
    from fused_optim._build_info import CUDA_BUILT as _CUDA_BUILT
except ImportError:  # a source tree that setup.py has not built
    _CUDA_BUILT = False


def cuda_built() -> bool:
    """True if this build has the CUDA kernels (set when setup.py ran)."""
    return _CUDA_BUILT


def require_device_supported(device: torch.device, dtype: torch.dtype, name: str) -> None:
    """Raises, before anything is written, for a device without kernels."""
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if _CUDA_BUILT:
            return
        raise RuntimeError(
            f"fused_optim.{name}: got a CUDA tensor, but this build of fused_optim "
            "has CPU kernels only (it was built without nvcc or with a CPU-only "
            "torch). Reinstall on a machine with the CUDA toolkit and a CUDA "
            "build of torch: `FORCE_CUDA=1 pip install --no-build-isolation .` "
            "(fused_optim.cuda_built() tells what a build has)."
        )
    # Our default step is the fused one, so torch's sentence for a fused step
    # on an unsupported device (which code written for torch may match) is
    # the accurate one, for fused=None as for fused=True.
    supported = ["cpu", "cuda"] if _CUDA_BUILT else ["cpu"]
    raise RuntimeError(
        f"fused_optim.{name}: `fused=True` requires all the params to be floating "
        f"point Tensors of supported devices: {supported} but {dtype} and "
        f"{device.type} (fused_optim's fused step, which fused=None runs too; "
        "fused=False runs torch.optim's own code, on any device)"
    )
