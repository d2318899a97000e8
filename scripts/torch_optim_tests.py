#!/usr/bin/env python3
"""Runs PyTorch's own optimizer tests with fused_optim's classes in place of
torch.optim's.

torch's test files are not in its wheel (nor in this repository): point
this at a PyTorch source checkout of the installed torch's version.

    python scripts/torch_optim_tests.py ~/pytorch/test/test_optim.py \\
        ~/pytorch/test/optim/test_lrscheduler.py [--baseline] [pytest args]

The test files do `from torch.optim import SGD, Adam, ...` and read torch's
test database (`torch.testing._internal.common_optimizers.optim_db`), so
before pytest imports them this swaps, for each class torch.optim shares
with us (SGD, Adam, AdamW, Adagrad, RMSprop, NAdam, RAdam), torch's class
for ours in torch.optim, in its module (torch.optim.adamw...) and in
optim_db. fused_optim is imported first: its classes hold torch's own
(`_torch_class`, for fused=False and differentiable=True), and so does the
table of functional optimizers it registers with torch.distributed.

--baseline runs the same files on torch's classes, to tell what fails on
torch itself (CUDA-only tests, a test file newer than the installed torch).
Last run: docs/design.md, "torch's own tests".
"""

from __future__ import annotations

import importlib
import sys


def swap_in_fused_optim() -> None:
    """Puts fused_optim's classes where torch's tests look for torch's."""
    import fused_optim
    import torch

    try:  # (fused_optim registers its classes there on this import)
        import torch.distributed.optim.utils  # noqa: F401
    except ImportError:
        pass
    from torch.testing._internal.common_optimizers import optim_db

    # Our classes torch.optim has too (fused_optim.__all__ lists ours).
    theirs = {name: getattr(torch.optim, name) for name in fused_optim.__all__
              if isinstance(getattr(fused_optim, name), type) and hasattr(torch.optim, name)}
    ours = {name: getattr(fused_optim, name) for name in theirs}
    swapped = set()
    for info in optim_db:
        name = info.optim_cls.__name__
        if name in theirs and info.optim_cls is theirs[name]:
            info.optim_cls = ours[name]
            swapped.add(name)
    for name, cls in theirs.items():
        setattr(torch.optim, name, ours[name])
        setattr(importlib.import_module(cls.__module__), name, ours[name])
    missing = set(theirs) - swapped
    if missing:
        sys.exit(f"torch_optim_tests: optim_db has no entry for {sorted(missing)}")


class _SwapPlugin:
    """Swaps before collection imports the test modules."""

    def pytest_configure(self, config) -> None:
        swap_in_fused_optim()


def main(argv: list[str]) -> int:
    import pytest

    args = [a for a in argv[1:] if a != "--baseline"]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    plugins = [] if "--baseline" in argv else [_SwapPlugin()]
    return pytest.main(["-p", "no:cacheprovider", *args], plugins=plugins)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
