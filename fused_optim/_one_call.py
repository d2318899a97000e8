"""The step that is one op call, and what it keeps from one step to the next.

Most steps are one call: every param in one bucket (one device, dtype, mode
and precision), every gradient present, no GradScaler, no group on torch's
path. The op checks all of its inputs before it writes any, so such a call
is its own validation (Note [validate before mutating] in _step.py).

Note [repeated call]
A training loop steps with the same groups, params and options every time.
Building the call from them (the per-group lists, then every argument by
name: _step.StepProtocol._op_call) costs about as much as the update of a
small model. So the call's argument tuple is kept, with the group options it
was built from, and a step re-reads only what can change without a new
plan: the gradients, the state tensors from the state dicts (a state tensor
the user replaced is the one updated, as in torch.optim), the step
counters, the master copies, when clipping the norm, and every group's lr
(an lr scheduler sets a new one every step; ``_learning_rates``, as the
general path reads it). The other group-derived arguments (the
hyperparameters, the flags, max_grad_norm) are rebuilt when any group
option other than lr is not the very object they were built from
(GroupOptions): every option, not only those the op reads, so nothing an
optimizer derives its arguments from can be missed. Options that could
change without being replaced (a tensor, changed in place; anything but a
number, string, dtype, None, or a tuple or list of these) make them read
afresh every step. What the plan caches (the params, their state dicts,
the buckets) the plan checks (_planning.py).
"""

from __future__ import annotations

import operator
from itertools import chain, compress, repeat

import torch

from fused_optim import _bucket, _ops
from fused_optim._build import require_device_supported
from fused_optim._bucket import Bucket
from fused_optim._ops import OpExtras

_IMMUTABLE = frozenset((float, int, bool, str, type(None), torch.dtype))


def _identical(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


class GroupOptions:
    """Every option of every group but ``lr`` (read every step) as a step
    saw it, compared by identity: an option replaced is a new object, even
    when it compares equal (a tensor equal to the float it replaced). An
    option that could change without being replaced is a list (its items
    compared by identity too), or makes the snapshot never match (``kept``
    False): a tensor, changed in place, or any other object. ``params`` is
    compared by identity only: the plan checks its contents
    (_bucket.Plan.same_params)."""

    def __init__(self, param_groups: list) -> None:
        self.lengths = tuple(map(len, param_groups))
        self.values = tuple(chain.from_iterable(map(dict.values, param_groups)))
        # False where the key is "lr" (each group's keys, in order)
        self.compared = tuple(map(operator.ne, chain.from_iterable(param_groups), repeat("lr")))
        self.lists = []  # (a list option, a copy of its items)
        self.kept = True
        params = set(map(id, map(operator.itemgetter("params"), param_groups)))
        # (the options of a type outside _IMMUTABLE, found at C speed: a
        # change of an option other than lr makes this)
        mutable = map(operator.not_, map(_IMMUTABLE.__contains__, map(type, self.values)))
        for value in compress(self.values, map(operator.and_, mutable, self.compared)):
            kind = type(value)
            if id(value) in params:
                continue
            if kind in (tuple, list) and _IMMUTABLE.issuperset(map(type, value)):
                if kind is list:
                    self.lists.append((value, list(value)))
            else:
                self.kept = False

    def unchanged(self, param_groups: list) -> bool:
        """Whether the groups hold the very options they held (lr aside)."""
        return (
            self.kept
            and tuple(map(len, param_groups)) == self.lengths
            and not any(compress(
                map(operator.is_not, chain.from_iterable(map(dict.values, param_groups)),
                    self.values),
                self.compared))
            and all(_identical(live, copy) for live, copy in self.lists)
        )


class OneCall:
    """A plan's one op call (its bucket), with its argument tuple kept
    between steps (Note [repeated call])."""

    def __init__(self, op_name: str, bucket: Bucket) -> None:
        self.bucket = bucket
        signature = _ops.SIGNATURES[op_name]
        index = signature.index
        self._grads = index["grads"]
        self._params = index["params"]
        self._states = [index[_ops.state_list_name(n)] for n in bucket.state_names]
        self._master = index["master_params"]
        self._steps = index["state_steps"]
        self._scalar_states = [index[_ops.state_list_name(n)] for n in bucket.scalar_state_names]
        self._grad_norm = index["grad_norm"]
        self._lr = index["lr"]
        self._options = None  # the GroupOptions the group arguments were read from
        self._group_args = None
        self._call = None  # the last call (its arguments a list, refreshed in place)

    def run(self, optimizer) -> bool:
        """Makes the call (the whole step) and returns True, or returns False
        having written nothing: the step needs the general path (a gradient
        missing, GradScaler's arguments, or the op refused the call; the
        general path finds why)."""
        if (getattr(optimizer, "grad_scale", None) is not None
                or getattr(optimizer, "found_inf", None) is not None):
            return False
        bucket = self.bucket
        grads, complete = _bucket.gather_grads(bucket.params)
        if not complete:
            return False
        groups = optimizer.param_groups
        lr, tensor_lr = optimizer._learning_rates()  # (every step: schedulers)
        if (self._options is None or not self._options.unchanged(groups)
                or (self._call is not None and self._call.tensor_lr != tensor_lr)):
            self._group_args = optimizer._group_arguments()
            self._options = GroupOptions(groups)
            self._call = None
        group_args = self._group_args
        grad_norm = optimizer._clip_norm(grads, None) if group_args.clipping else None
        if self._call is None:
            require_device_supported(bucket.device, type(optimizer).__name__)
            extras = OpExtras(bucket.master_params(), None, None,
                              bucket.precision.stochastic_rounding, grad_norm)
            call = optimizer._op_call(bucket, grads, group_args, extras)
            self._call = call._replace(args=list(call.args))
        else:
            self._refresh(grads, grad_norm)
            self._call.args[self._lr] = lr
        try:
            _ops.call_fast(self._call)
        except RuntimeError:
            self._call = None  # (built afresh next time)
            return False  # nothing was written
        finally:
            if self._call is not None:
                self._release_step_tensors()
        bucket.new_state.clear()
        if grad_norm is not None:
            optimizer._grad_norm_cell[0] = grad_norm
        return True

    def _release_step_tensors(self) -> None:
        """Drops this step's tensors from the kept arguments: a kept
        gradient would outlive ``zero_grad(set_to_none=True)`` (a model's
        worth of memory until the next step), a replaced state tensor its
        replacement."""
        args = self._call.args
        args[self._grads] = []
        for slot in (*self._states, self._master, self._steps, *self._scalar_states):
            args[slot] = []
        args[self._grad_norm] = None
        args[self._params] = []

    def _refresh(self, grads: list, grad_norm) -> None:
        """Puts this step's tensors into the kept arguments."""
        bucket, args = self.bucket, self._call.args
        params, grads, states = _bucket.call_tensors(bucket, grads)
        args[self._params] = params
        args[self._grads] = grads
        for slot, tensors in zip(self._states, states):
            args[slot] = tensors
        args[self._master] = bucket.master_params()
        args[self._steps] = bucket.steps()
        for slot, tensors in zip(self._scalar_states, bucket.scalar_state_lists()):
            args[slot] = tensors
        args[self._grad_norm] = grad_norm
