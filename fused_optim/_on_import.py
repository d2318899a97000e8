"""Run a function once a module of torch is imported, by whoever imports it.

fused_optim registers itself with parts of torch.distributed (DTensor's
handler for our ops, the functional twins of our classes) that cost up to a
second to import and that most programs never load. Importing them from
``import fused_optim`` would make every user pay for them; instead each
registration runs right after its module is imported (or at once, if it
already was), in whichever order the two are imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable

# module name -> the functions to run after it is imported
_PENDING: dict[str, list[Callable[[], None]]] = {}


def when_imported(module: str, fn: Callable[[], None]) -> None:
    """Calls ``fn()`` now if ``module`` is imported, else right after its
    import executes (once)."""
    if module in sys.modules:
        fn()
        return
    _PENDING.setdefault(module, []).append(fn)
    if not any(isinstance(f, _RunAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RunAfterImport())


class _RunAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a pending module, it asks the other finders
    for the spec and wraps its loader so that the pending functions run once
    the module has executed; it leaves sys.meta_path when none is pending."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PENDING:
            return None
        fns = _PENDING.pop(fullname)  # (before find_spec: it asks us again)
        if not _PENDING:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_run(module):
            exec_module(module)
            for fn in fns:
                fn()

        spec.loader.exec_module = exec_then_run
        return spec
