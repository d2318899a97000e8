"""Groups the tensors of ALL param groups into op calls, cached between steps.

A *bucket* is the set of tensors that one op call updates: same device, same
dtype, same mode flags (the flags that select a different kernel, e.g.
amsgrad or nesterov). Each tensor keeps its own group's hyperparameters
through ``group_index``, so ten param groups with different learning rates
still take one call.

Building a bucket walks every param in Python; a step must not. So the plan
(the list of buckets) is built once and reused until something it was built
from changes: the param groups (added, resized, or a mode flag changed), the
set of params with state, or the state itself (``load_state_dict``). A step
then only gathers, with C-speed list operations, the gradients (``p.grad`` for
each param, unavoidable since ``zero_grad(set_to_none=True)`` makes new
gradient tensors every step) and the state tensors from the cached per-param
state dicts (so a state tensor replaced by the user is the one updated, as in
torch.optim), and reads each group's hyperparameters; the kept calls of a
step read them only when a group option changed (Note [repeated call] in
_kept_calls.py).

A param's whole state dict replaced (``opt.state[p] = {...}``) is seen
through the write count of ``optimizer.state`` (_state.py); a param replaced
inside its group (``group["params"][i] = q``) by an identity check of the
planned params. Changes to a param itself (its dtype, device or memory) are
seen by the op: Note [stale plans] in _step.py.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from fused_optim import _C, _ops


class Precision(NamedTuple):
    """How the tensors of a bucket are stored (see _precision.precision_of)."""

    # a float32 copy of each fp16/bf16 param in state["master_param"]
    master_weights: bool
    # dtype of the state tensors (the param dtype unless chosen)
    state_dtype: torch.dtype
    # bf16 param writes rounded stochastically
    stochastic_rounding: bool


@dataclass
class Bucket:
    """The tensors of one op call, as aligned lists."""

    device: torch.device
    dtype: torch.dtype
    mode: tuple
    params: list = field(default_factory=list)
    # names of the state tensors the op uses, in op order
    state_names: tuple = ()
    # the per-param state dicts, aligned with params: a step reads the
    # tensors from them (torch.optim reads the state every step too, so
    # `opt.state[p]["exp_avg"] = t` takes effect at the next step)
    state_dicts: list = field(default_factory=list)
    has_step: bool = False
    # keys of the per-param scalar state (FusedOptimizer._scalar_state_names)
    scalar_state_names: tuple = ()
    group_index: list = field(default_factory=list)
    # (group, position in group["params"]) of each tensor, for error
    # messages and stochastic rounding's random streams (rounding_ids)
    positions: list = field(default_factory=list)
    # indices of tensors whose state was created for the coming step (SGD's
    # momentum buffer starts as the gradient itself on its first step)
    new_state: list = field(default_factory=list)
    precision: Precision | None = None
    _rounding_ids: list | None = field(default=None, repr=False)

    @property
    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def state_lists(self) -> list:
        """One list of tensors per state name, read from the state dicts now."""
        return [list(map(operator.itemgetter(name), self.state_dicts)) for name in self.state_names]

    def scalar_state_lists(self) -> list:
        """One list of 0-d tensors per scalar state name, read now."""
        return [list(map(operator.itemgetter(name), self.state_dicts))
                for name in self.scalar_state_names]

    def master_params(self) -> list:
        """The float32 master copies, or [] without master weights."""
        if not self.precision.master_weights:
            return []
        return list(map(operator.itemgetter("master_param"), self.state_dicts))

    def steps(self) -> list:
        if not self.has_step:
            return []
        return list(map(operator.itemgetter("step"), self.state_dicts))

    def op_extras(self, scalars: "StepScalars") -> _ops.OpExtras:
        """This bucket's call's arguments besides its tensors and the
        groups': its master copies and this step's scalars on its device."""
        grad_scale, found_inf, grad_norm = scalars.on(self.device)
        rounding = self.precision.stochastic_rounding
        return _ops.OpExtras(self.master_params(), grad_scale, found_inf, rounding, grad_norm,
                             self.rounding_ids() if rounding else None)

    def rounding_ids(self) -> list:
        """Each tensor's stochastic-rounding id (_ops.rounding_ids_of),
        made once: a planned bucket's positions do not change."""
        if self._rounding_ids is None:
            self._rounding_ids = _ops.rounding_ids_of(self.positions)
        return self._rounding_ids

    def per_param_lists(self) -> list:
        """(the op's list name, the state key) of every list of a call read
        from the state dicts: the state tensors, then the master copies,
        the step counters and the scalar state, where the bucket has them."""
        keys = list(self.state_names)
        if self.precision.master_weights:
            keys.append("master_param")
        if self.has_step:
            keys.append("step")
        keys += self.scalar_state_names
        return [(_ops.state_list_name(key), key) for key in keys]


@dataclass
class Plan:
    buckets: list
    # params whose state is not ready for their group and that had no
    # gradient when planned: those with no state yet, and those whose group
    # turned on a mode since (Adam's amsgrad, RMSprop's centered or momentum,
    # SGD's momentum). Checked every step: a gradient on one re-plans, which
    # makes its state.
    unready: list
    signature: tuple
    # each group's params when planned: a param replaced in place
    # (``group["params"][i] = q``) leaves the signature as it was
    params: list
    # indices of the groups stepped by torch.optim's code (fused=False,
    # differentiable=True: _torch_path.py); part of the signature
    torch_groups: list
    # the group options when last checked (_group_options.GroupOptions): a
    # step that finds them unchanged, and the state mapping too, skips the
    # signature checks
    options: object
    # the signature over the raw options (a fast check; None: none)
    raw_signature: tuple | None = None
    # the step's op calls, kept between steps (_kept_calls.py), made by the
    # first step that takes them
    kept_calls: object = None

    def state_unchanged(self, state) -> bool:
        """Whether ``optimizer.state`` is the mapping planned, with the same
        params and no param's state dict replaced (the signature's part
        that is not the groups')."""
        return (id(state), len(state), state.writes) == self.signature[:3]

    def same_params(self, param_groups) -> bool:
        """Whether every group still holds the planned params (by identity:
        about 20 us per 1000 params, C-speed)."""
        return all([
            len(group["params"]) == len(planned) and all(map(operator.is_, group["params"], planned))
            for group, planned in zip(param_groups, self.params)
        ])


def groups_signature(optimizer, key_of) -> tuple:
    """What the plan depends on, cheap to recompute each step (one entry per
    group, not per param)."""
    return (
        id(optimizer.state),
        len(optimizer.state),
        # every write to the mapping (a param's state dict replaced): _state.py
        optimizer.state.writes,
        tuple(
            (id(group["params"]), len(group["params"]), key_of(group))
            for group in optimizer.param_groups
        ),
    )


class StepScalars:
    """A step's AMP and clipping scalars (GradScaler's ``grad_scale`` and
    ``found_inf``, the clipping norm), each given to a call on that call's
    device: copied once per device, without a host sync."""

    def __init__(self, grad_scale, found_inf, grad_norm) -> None:
        self._values = (grad_scale, found_inf, grad_norm)
        self._none = grad_scale is None and found_inf is None and grad_norm is None
        self._on_device = {}  # device -> the three there

    def on(self, device) -> tuple:
        """(grad_scale, found_inf, grad_norm) on ``device`` (None where none)."""
        if self._none:  # (the usual step: nothing to copy)
            return self._values
        scalars = self._on_device.get(device)
        if scalars is None:
            scalars = self._on_device[device] = tuple(
                None if t is None else t.to(device, non_blocking=True) for t in self._values)
        return scalars


def clear_new_state(buckets: list) -> None:
    """After a step: the state made for it is no longer new. (A step that
    AMP skipped takes that state back instead: Note [a step AMP skips makes
    no state] in _step.py.)"""
    for bucket in buckets:
        bucket.new_state.clear()


def gather_grads(params: list) -> tuple[list, bool, bool]:
    """Returns (``[p.grad for p in params]``, whether none is None, whether
    none is sparse), read in C++ (``_C.grads_of``: the Python property
    costs ~0.2 us a param)."""
    return _C.grads_of(params)


def select(bucket: Bucket, grads: list) -> tuple[Bucket, list]:
    """The sub-bucket of the tensors that have a gradient this step."""
    keep = [i for i, g in enumerate(grads) if g is not None]
    sub = Bucket(bucket.device, bucket.dtype, bucket.mode, state_names=bucket.state_names,
                 has_step=bucket.has_step, scalar_state_names=bucket.scalar_state_names,
                 precision=bucket.precision)
    sub.params = [bucket.params[i] for i in keep]
    sub.state_dicts = [bucket.state_dicts[i] for i in keep]
    sub.group_index = [bucket.group_index[i] for i in keep]
    sub.positions = [bucket.positions[i] for i in keep]
    position_of = {old: new for new, old in enumerate(keep)}
    sub.new_state = [position_of[i] for i in bucket.new_state if i in position_of]
    return sub, [grads[i] for i in keep]


def call_tensors(bucket: Bucket, grads: list) -> tuple[list, list, list]:
    """(params, grads, state lists) of one call of ``bucket``, the state read
    from the state dicts now; complex tensors as real views (``as_real``)."""
    if bucket.is_complex:
        return real_views(bucket.params, grads, bucket.state_lists())
    return bucket.params, grads, bucket.state_lists()


def real_views(params: list, grads: list, states: list) -> tuple[list, list, list]:
    """A complex call's params, grads and state lists as real views."""
    return as_real(params), as_real(grads), [as_real(s) for s in states]


def as_real(tensors: list) -> list:
    """view_as_real of each complex tensor: complex params are updated as
    pairs of reals, exactly as torch.optim does."""
    return [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
