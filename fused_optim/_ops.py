"""The two ways the classes call an op, and the one list of op names.

Eager steps call ``fused_optim._C.<op>`` (Note [fast op call] in
csrc/python_module.cpp): positional arguments in schema order, converted
while holding the GIL. Traced steps (torch.compile) call
``torch.ops.fused_optim.<op>``, the public op, which takes its mode flags as
keywords (they follow ``*`` in the schema). Both take the same positional
tuple here, so a class builds its arguments once (``_op_arguments``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fused_optim import _C

OP_NAMES = ("adam_", "sgd_", "adagrad_", "rmsprop_")


def _keyword_names(name: str) -> tuple[int, tuple]:
    """(number of positional arguments, names of the keyword-only ones)."""
    arguments = getattr(torch.ops.fused_optim, name).default._schema.arguments
    keywords = tuple(a.name for a in arguments if a.kwarg_only)
    return len(arguments) - len(keywords), keywords


_SCHEMAS = {name: _keyword_names(name) for name in OP_NAMES}


def call_fast(name: str, args: tuple) -> None:
    """The eager entry: the backend kernel without the dispatcher's
    per-tensor boxing (DTensors still reach their handler, _dtensor.py)."""
    getattr(_C, name)(*args)


def call_validate(name: str, args: tuple) -> None:
    """The eager entry's checks alone: raises what ``call_fast`` would
    raise, writes nothing (Note [validate only] in csrc/op_inputs.h)."""
    getattr(_C, "validate_" + name)(*args)


def call_public(name: str, args: tuple) -> None:
    """The public, traceable op with the same positional tuple."""
    positional, keywords = _SCHEMAS[name]
    getattr(torch.ops.fused_optim, name)(
        *args[:positional], **dict(zip(keywords, args[positional:]))
    )


class OpExtras(NamedTuple):
    """The op arguments every op shares (csrc/op_args.h)."""

    master_params: list
    lr_tensors: list
    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor | None
    stochastic_rounding: bool

    @property
    def tail(self) -> tuple:
        """(lr_tensors, grad_scale, found_inf): the op's arguments after the
        per-group hyperparameters."""
        return (self.lr_tensors, self.grad_scale, self.found_inf)
