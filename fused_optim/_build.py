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


def kernel_devices() -> list:
    """The device types this build has fused kernels for."""
    return ["cpu", "cuda"] if _CUDA_BUILT else ["cpu"]


def has_kernels(device: torch.device) -> bool:
    """Whether this build has fused kernels for ``device``."""
    return device.type == "cpu" or (device.type == "cuda" and _CUDA_BUILT)


_REINSTALL_WITH_CUDA = (
    "Reinstall on a machine with the CUDA toolkit and a CUDA build of torch: "
    "`FORCE_CUDA=1 pip install --no-build-isolation .` (fused_optim.cuda_built() "
    "tells what a build has)."
)


def require_device_supported(device: torch.device, dtype: torch.dtype, name: str) -> None:
    """Raises, before anything is written, for a device without kernels,
    where the fused step was asked for (Note [params on a device without
    kernels] in _base.py says when torch.optim's code steps them instead)."""
    if has_kernels(device):
        return
    if device.type == "cuda":
        raise RuntimeError(
            f"fused_optim.{name}: got a CUDA tensor, but this build of fused_optim "
            "has CPU kernels only (it was built without nvcc or with a CPU-only "
            f"torch), and the fused step was asked for ({_WHAT_ASKS}). "
            + _REINSTALL_WITH_CUDA
        )
    # torch's sentence for a fused step on an unsupported device (which
    # code written for torch may match), then ours.
    raise RuntimeError(
        f"fused_optim.{name}: `fused=True` requires all the params to be floating "
        f"point Tensors of supported devices: {kernel_devices()} but {dtype} and "
        f"{device.type} (fused_optim's fused step, asked for by {_WHAT_ASKS}; "
        "without them, torch.optim's own code steps such params)"
    )


# What makes a group's step the fused one on any device.
_WHAT_ASKS = ("fused=True, our precision options or max_grad_norm, or a class "
              "torch.optim lacks (Lion, Lars, Lamb)")


def unsupported_device_warning(name: str, device_type: str, takes_fused: bool) -> str:
    """The warning for a group that torch.optim's code steps because its
    params are on ``device_type``, without kernels here; ``takes_fused``:
    the class has a ``fused`` keyword, whose False says the same."""
    message = (
        f"fused_optim.{name}: this build has no fused kernels for {device_type} "
        f"params (it has {', '.join(kernel_devices())}): their param groups are "
        "stepped by torch.optim's own implementation"
    )
    if takes_fused:
        message += (", as with fused=False (pass fused=False to choose that and "
                    "silence this warning)")
    message += "."
    return message + (" " + _REINSTALL_WITH_CUDA if device_type == "cuda" else "")
