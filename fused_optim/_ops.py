"""The op calls of the optimizer classes, built by name from the ops' schemas.

Each op's argument list is written once, in C++: its spec
(csrc/include/fused_optim/op_specs.h), from which csrc/op_schema.cpp makes the
schema. Every op's schema has one shape (params, grads, the state lists,
master_params, state_steps, [the per-tensor scalar state list,] group_index,
lr, the per-group hyperparameters, the per-group flags, max_grad_norm, [the
new-state list], grad_scale, found_inf, grad_norm, [tensor_sums,] then the
keyword-only mode flags, stochastic_rounding and rounding_ids); ``OpSignature`` reads the
names from the schema, checks that shape, and builds a call's positional
tuple from named values. A state list is named after its state key plus
"s" (``exp_avg`` -> ``exp_avgs``, ``sum`` -> ``sums``).

Two overloads per op: ``float[] lr`` (``.default``) and ``Tensor[] lr``
(``.tensor_lr``: the kernel reads each group's lr tensor where it lives).
An op whose update reads per-tensor norms (``TENSOR_NORM_OPS``: those with
a ``tensor_sums`` argument) has two more, ``.measure`` and
``.measure_tensor_lr``, which return the sums of squares a call would read
(Note [norms across shards] in csrc/op_front.h; _dtensor.py uses them).

Eager steps call ``fused_optim._C.<op>`` (Note [fast op call] in
csrc/python_module.cpp): positional arguments in schema order, converted
while holding the GIL. Traced steps (torch.compile) call
``torch.ops.fused_optim.<op>``, the public op, which takes its mode flags as
keywords (they follow ``*`` in the schema). Both take the same tuple here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from fused_optim import _C

OP_NAMES = tuple(_C.OP_NAMES)  # (op_specs.h's FO_FOR_EACH_OP)
OVERLOADS = ("default", "tensor_lr")


class OpSignature:
    """An op's arguments by role, read from its schema."""

    def __init__(self, name: str) -> None:
        self.name = name
        arguments = getattr(torch.ops.fused_optim, name).default._schema.arguments
        names = [a.name for a in arguments]
        types = {a.name: str(a.type) for a in arguments}
        # each argument's position in a call's tuple
        self.index = {n: i for i, n in enumerate(names)}
        first_state, master = names.index("grads") + 1, names.index("master_params")
        lr = names.index("lr")
        # The per-tensor scalar state list (nadam_'s mu_products), or none:
        # Note [per-tensor scalar state] in csrc/include/fused_optim/hyperparams.h.
        self.scalar_state = tuple(names[names.index("state_steps") + 1:names.index("group_index")])
        self.state_lists = tuple(names[first_state:master])
        self.hyperparameters = tuple(
            n for n in names[lr + 1:] if types[n] == "List[float]" and n != "max_grad_norm"
        )
        self.group_flags = tuple(n for n in names if types[n] == "List[bool]")
        self.new_state = next((n for n in names[lr + 1:] if types[n] == "List[int]"), None)
        # Note [per-tensor norms] (hyperparams.h): the op's update reads
        # each tensor's norms, and a caller may give their sums.
        self.reads_tensor_norms = "tensor_sums" in names
        self.keywords = tuple(a.name for a in arguments if a.kwarg_only)
        self.modes = self.keywords[:-2]
        self.num_positional = len(names) - len(self.keywords)
        expected = (
            ["params", "grads", *self.state_lists, "master_params", "state_steps",
             *self.scalar_state, "group_index", "lr", *self.hyperparameters, *self.group_flags,
             "max_grad_norm"]
            + ([self.new_state] if self.new_state else [])
            + ["grad_scale", "found_inf", "grad_norm"]
            + (["tensor_sums"] if self.reads_tensor_norms else [])
            + [*self.modes, "stochastic_rounding", "rounding_ids"]
        )
        if names != expected:  # (the shape csrc/op_schema.cpp writes)
            raise RuntimeError(f"fused_optim.{name}: unexpected schema {names}")

    def arguments(self, *, params, grads, states: dict, master_params, steps, group_index,
                  lr, hyper: dict, group_flags: dict, new_state, grad_scale, found_inf,
                  modes: dict, stochastic_rounding: bool, scalar_states: dict | None = None,
                  max_grad_norm=None, grad_norm=None, tensor_sums=None,
                  rounding_ids=None) -> tuple:
        """The call's arguments in schema order (keywords last). ``states``
        maps state list names to lists (a name left out: an empty list),
        ``hyper`` and ``group_flags`` map names to per-group lists,
        ``modes`` the mode flags to bools, ``scalar_states`` the scalar
        state list's name to its list (left out: an empty list);
        ``max_grad_norm`` (per group; None: no group clipped) and
        ``grad_norm`` are clipping's; ``tensor_sums`` (ops that read
        per-tensor norms only; None: the op computes them) are Note [norms
        across shards]'s; ``rounding_ids`` (or None) each tensor's
        stochastic-rounding id, ``rounding_ids_of``."""
        scalar_states = scalar_states or {}
        if tensor_sums is not None and not self.reads_tensor_norms:
            raise ValueError(f"fused_optim.{self.name} reads no per-tensor norms: no tensor_sums")
        if max_grad_norm is None:
            max_grad_norm = [math.inf] * len(lr)
        return (
            params,
            grads,
            *[states.get(n, []) for n in self.state_lists],
            master_params,
            steps,
            *[scalar_states.get(n, []) for n in self.scalar_state],
            group_index,
            lr,
            *[hyper[n] for n in self.hyperparameters],
            *[group_flags[n] for n in self.group_flags],
            max_grad_norm,
            *([new_state] if self.new_state else []),
            grad_scale,
            found_inf,
            grad_norm,
            *([tensor_sums] if self.reads_tensor_norms else []),
            *[modes[n] for n in self.modes],
            stochastic_rounding,
            rounding_ids,
        )


SIGNATURES = {name: OpSignature(name) for name in OP_NAMES}
# The ops whose update reads each tensor's norms (Hyper::kHasTensorNorms):
# not pointwise, so a call on shards needs their sums across the shards
# (_dtensor.py, Note [norms across shards]).
TENSOR_NORM_OPS = frozenset(n for n, s in SIGNATURES.items() if s.reads_tensor_norms)
MEASURE_OVERLOADS = ("measure", "measure_tensor_lr")


def _measure_fake(params, *args, **kwargs):
    """The ``measure`` overloads' result under fake tensors (torch.compile):
    float64 [2n] on the params' device."""
    device = params[0].device if params else torch.device("cpu")
    return torch.empty(2 * len(params), dtype=torch.float64, device=device)


for _name in TENSOR_NORM_OPS:
    for _overload in MEASURE_OVERLOADS:
        torch.library.register_fake(f"fused_optim::{_name}.{_overload}")(_measure_fake)


# The op's lists whose names are not their state key's plural.
_LIST_OF_KEY = {"master_param": "master_params", "step": "state_steps"}


def state_list_name(key: str) -> str:
    """The op's list of a state key: ``exp_avg`` -> ``exp_avgs``,
    ``master_param`` -> ``master_params``, ``step`` -> ``state_steps``."""
    return _LIST_OF_KEY.get(key, key + "s")


class OpCall(NamedTuple):
    """One op call: the op, whether its lr is a tensor list, its arguments."""

    name: str
    tensor_lr: bool
    args: tuple


def fast_entry(name: str, tensor_lr: bool):
    """The eager entry of op ``name``: the backend kernel without the
    dispatcher's per-tensor boxing (DTensors still reach their handler,
    _dtensor.py)."""
    return getattr(_C, name + ("_tensor_lr" if tensor_lr else ""))


def fast_function(call: OpCall):
    """``fast_entry`` of ``call``'s op."""
    return fast_entry(call.name, call.tensor_lr)


def call_fast(call: OpCall) -> bool:
    """Makes ``call`` through its eager entry (``fast_function``); False
    where it was not made: a ``_C.GradsOf`` argument with a gradient
    missing or sparse (Note [gradients read in C++] in
    csrc/python_module.cpp; lists of tensors: always True)."""
    return fast_function(call)(*call.args)


def validate_entry(name: str, tensor_lr: bool):
    """``fast_entry``'s twin that only checks: raises what the entry would
    raise, returns what it would return, writes nothing (Note [validate
    only] in csrc/op_inputs.h)."""
    return getattr(_C, "validate_" + name + ("_tensor_lr" if tensor_lr else ""))


def call_validate(call: OpCall) -> bool:
    """``call_fast``'s checks alone (``validate_entry``)."""
    return validate_entry(call.name, call.tensor_lr)(*call.args)


def public_op(name: str, tensor_lr: bool):
    """torch.ops.fused_optim.<name>.default or .tensor_lr."""
    return getattr(getattr(torch.ops.fused_optim, name), "tensor_lr" if tensor_lr else "default")


def call_public(call: OpCall) -> None:
    """The public, traceable op with the same arguments."""
    signature = SIGNATURES[call.name]
    positional = signature.num_positional
    public_op(call.name, call.tensor_lr)(
        *call.args[:positional], **dict(zip(signature.keywords, call.args[positional:]))
    )


class OpExtras(NamedTuple):
    """The per-call arguments every op shares besides its tensors."""

    master_params: list
    grad_scale: torch.Tensor | None
    found_inf: torch.Tensor | None
    stochastic_rounding: bool
    grad_norm: torch.Tensor | None = None  # clipping (on the call's device)
    rounding_ids: list | None = None  # with stochastic_rounding: rounding_ids_of


def rounding_ids_of(positions) -> list:
    """The ops' ``rounding_ids`` of tensors at ``positions``, (param group,
    position in its ``params``) pairs: (group << 32) | position, so that a
    param's stochastic rounding draws the same random bits however a step
    splits its params into calls (eager or compiled, some gradients
    missing; csrc/include/fused_optim/precision.h)."""
    return [(gi << 32) | pi for gi, pi in positions]


class GroupArguments(NamedTuple):
    """The per-group arguments of a step's op calls (one entry per group)."""

    lr: list  # floats, or tensors when tensor_lr
    tensor_lr: bool
    hyper: dict  # name -> list of floats
    flags: dict  # name -> list of bools (maximize, decoupled_weight_decay)
    max_grad_norm: list  # floats (inf: not clipped)
    clipping: bool  # whether a group has max_grad_norm (the norm is needed)
