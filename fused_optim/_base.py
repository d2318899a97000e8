"""What every fused optimizer shares: the step protocol around one op call.

A subclass (see adam.py) says which state it keeps, how to create it, which
group options select a kernel (``_mode``), which hyperparameters it reads per
group, and how to call its op. This class does the bookkeeping:

1. plan: bucket the params of all groups by (device, dtype, mode), creating
   state lazily for params that got their first gradient (``_bucket.py``);
2. validate everything, for every bucket, before anything is written;
3. one op call per bucket; the op increments the step counters itself.

Note [validate before mutating]
A step that raises leaves every param, gradient, state tensor, step counter
and group option as it was (torch.optim does not: its Adam updates the
first group before it notices a sparse gradient in the second). The ops
check all of their inputs before writing any; with more than one call per
step every call is checked first (the op's own checks, run alone: Note
[validate only] in csrc/op_inputs.h), then all are made. What the step
changes before its first write (state created for new params, state
brought to the precision options) goes through a journal (_journal.py)
and is taken back if the step raises.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

from fused_optim import _bucket, _ops, _torch_path
from fused_optim._traced import TracedStep
from fused_optim._bucket import Bucket, Plan, Precision
from fused_optim._journal import Journal
from fused_optim._state import OptimizerState
from fused_optim._ops import OpExtras
from fused_optim._precision import (
    PRECISION_DEFAULTS,
    precision_of,
    real_dtype,
    state_dtype_of,
)
from fused_optim._build import require_device_supported

# Group options of ours (not torch.optim's) that every fused optimizer takes.
def check_implementation_keywords(name: str, *, foreach, fused, differentiable, precision: dict):
    """torch.optim's checks of the implementation keywords (same exception
    types and messages), and ours for combining them with our precision
    options. What each keyword then does: Note [implementation keywords]."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    check_torch_path_precision(name, {"fused": fused, "differentiable": differentiable, **precision})


# Note [implementation keywords]
# - fused=None or True: our fused step (the only thing fused can mean here).
# - foreach=True with fused=None: also the fused step. foreach asks for a
#   multi-tensor implementation; ours is one, and a strictly faster one,
#   with the same math and state. (torch.optim refuses a tensor lr with
#   foreach=True and capturable=False only because its foreach code cannot
#   read one; ours can, so we accept it.)
# - fused=False: torch.optim's own unfused step for that group, with
#   foreach as given (None lets torch choose, as it would): the user asked
#   for torch's code, so it runs (_torch_path.py). Same for
#   differentiable=True, which only torch's code can honour.
# - capturable=True: on CUDA our step never syncs with the host whatever
#   the flag; on CPU params it changes nothing, as for torch's fused step
#   (torch's foreach and single-tensor code refuse CPU params with it, a
#   limit of that code, not of the request).


def check_torch_path_precision(name: str, group) -> None:
    """Our precision options live in our kernels only: a group that runs
    torch.optim's implementation cannot have them."""
    if not _torch_path.uses_torch_path(group):
        return
    chosen = [k for k, v in PRECISION_DEFAULTS.items() if group.get(k, v) not in (v, None, False)]
    if chosen:
        asked = "fused=False" if group.get("fused") is False else "differentiable=True"
        raise ValueError(
            f"fused_optim.{name}: {', '.join(chosen)} need(s) the fused step, but "
            f"{asked} runs torch.optim's implementation, which has no such option"
        )


def to_float(value) -> float:
    """A hyperparameter as a Python float (torch allows 1-element tensors)."""
    return value.item() if isinstance(value, torch.Tensor) else float(value)


# Note [implementation keywords on load]
# torch.optim's load_state_dict replaces a group's options with the saved
# ones, implementation keywords included, so a checkpoint of
# torch.optim.AdamW(fused=False) (build-nanogpt on CPU writes such) would
# quietly put a fused_optim optimizer on torch's unfused path. How this
# optimizer runs is its own choice, not training state: loading keeps its
# foreach, fused, capturable and differentiable (strictly better; the
# hyperparameters are loaded as torch loads them).
_IMPLEMENTATION_KEYWORDS = ("foreach", "fused", "capturable", "differentiable")


class FusedOptimizer(TracedStep, Optimizer):
    """Base class of the fused optimizers. Not for direct use."""

    # Whether the optimizer keeps a per-param ``step`` counter (SGD does not).
    _has_step = True
    # Whether sparse gradients are supported (through torch's functional API).
    _supports_sparse = False
    # torch.amp.GradScaler hands ``grad_scale`` and ``found_inf`` to step()
    # (as attributes) instead of unscaling the gradients itself: the kernels
    # unscale in registers and skip the step on inf/NaN without a host sync.
    _step_supports_amp_scaling = True

    # The op (fused_optim._ops.OP_NAMES) and the torch.optim class whose
    # step runs groups with fused=False or differentiable=True.
    _op_name: str
    _torch_class: type

    def __init__(self, params, defaults):
        self._plan: Plan | None = None
        super().__init__(params, defaults)
        self.state = OptimizerState(self.state)
        if _torch_path.uses_torch_path(self.defaults):
            # As torch.optim: GradScaler unscales for an unfused optimizer.
            self._step_supports_amp_scaling = False

    # ----- subclass interface -------------------------------------------------

    def _mode(self, group) -> tuple:
        """Group options that select a different kernel (one call per mode)."""
        raise NotImplementedError

    def _state_names(self, mode: tuple) -> tuple:
        """Dense state tensors the op takes, in op order, for this mode."""
        raise NotImplementedError

    def _init_state(self, param, group, state: dict, dtype: torch.dtype) -> bool:
        """Fills in a param's missing state: the step counter and a zero
        tensor of ``dtype`` (the state dtype) per state name (torch.optim's
        initial state for Adam, AdamW and RMSprop; SGD and Adagrad
        override). Returns True if the op must treat the state as new (SGD's
        first momentum step)."""
        if self._keeps_step(group):
            state.setdefault("step", new_step(param.device))
        for name in self._state_names(self._mode(group)):
            if name not in state:
                state[name] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        return False

    def _keeps_step(self, group) -> bool:
        """Whether params of this group have a ``step`` counter."""
        return self._has_step

    def _needs_state_for(self, group, state: dict, precision: Precision) -> bool:
        """Whether a param that has a gradient needs (more) state created:
        some state this group's mode uses is missing, or its master copy
        (SGD without momentum has no other state)."""
        names = self._state_names(self._mode(group))
        return (
            any(name not in state for name in names)
            or (self._keeps_step(group) and "step" not in state)
            or (precision.master_weights and "master_param" not in state)
        )

    def _group_key(self, group) -> tuple:
        """Everything of a group that decides its buckets: the kernel mode
        and the precision options."""
        if _torch_path.uses_torch_path(group):
            return None
        return (self._mode(group), *map(group.get, PRECISION_DEFAULTS))

    def _lr(self, group) -> float:
        """The group's lr as a float for the op, unless it is a tensor on an
        accelerator: the kernel reads that one itself (``lr_tensors``), so
        the step needs no host sync and a captured CUDA graph sees the
        scheduler's updates; NaN is then a placeholder nobody reads."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and (
            lr.device.type != "cpu" or torch.compiler.is_compiling()
        ):
            return math.nan
        return to_float(lr)

    def _hyperparameters(self, group) -> tuple:
        """This group's per-group op arguments, as floats, in op order."""
        raise NotImplementedError

    def _op_arguments(self, mode, params, grads, states, steps, group_index, new_state, hyper, extras) -> tuple:
        """The op's positional arguments (its schema's order, mode flags
        last) for one call: ``states`` holds one list per state name of
        ``mode``, ``steps`` the step counters (or []), ``new_state`` the
        indices of tensors whose state is new this step, ``hyper`` one list
        per hyperparameter with one entry per group, ``extras`` the
        arguments every op shares."""
        raise NotImplementedError

    def _launch(self, bucket: Bucket, grads: list, hyper: list, extras: OpExtras,
                validate: bool = False) -> None:
        """Calls the op on one bucket, through fused_optim._C (the same
        kernel as torch.ops.fused_optim.<op>, with a cheaper crossing for
        thousands of tensors: Note [fast op call] in
        csrc/python_module.cpp); with ``validate``, only its checks."""
        params, grads, states = self._op_lists(bucket, grads)
        args = self._op_arguments(
            bucket.mode, params, grads, states, bucket.steps(), bucket.group_index,
            bucket.new_state, hyper, extras,
        )
        (_ops.call_validate if validate else _ops.call_fast)(self._op_name, args)

    def _sparse_step(self, group, params, grads, is_new) -> None:
        """Updates params with sparse gradients (SGD, Adagrad); ``is_new[i]``
        says the param's state was created for this step."""
        raise NotImplementedError

    def _check_sparse(self, group, param, grad) -> None:
        """Raises if this sparse gradient cannot be applied."""

    # ----- torch.optim.Optimizer API -------------------------------------------

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._plan = None

    def state_dict(self):
        """torch.optim's ``state_dict``, in torch.optim's layout: our
        precision options (master_weights, state_dtype, stochastic_rounding)
        are configuration, like the constructor's arguments, and are not in
        the param groups, so that a checkpoint of ours has the keys of
        torch.optim's and torch.distributed.checkpoint loads a torch.optim
        checkpoint into ours (its default planner requires every key of
        ours to be in the checkpoint). Our extra state (``master_param``)
        stays in ``state``. Hooks run as in torch.optim; post-hooks see the
        final dict."""
        with _hooks_set_aside(self, "_optimizer_state_dict_post_hooks") as (post_hooks,):
            state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            for key in PRECISION_DEFAULTS:
                group.pop(key, None)
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict):
        """torch.optim's ``load_state_dict`` (pre-hooks, then the load, then
        post-hooks), with the loaded layout checked before anything changes
        (Note [validate before mutating]) and the state brought to this
        optimizer's precision options afterwards. Param groups keep their
        precision options unless the checkpoint has them (older ones of
        ours did)."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_state_dict(state_dict)
        ours = [{k: g[k] for k in PRECISION_DEFAULTS if k in g} for g in self.param_groups]
        implementation = [
            {k: g[k] for k in _IMPLEMENTATION_KEYWORDS if k in g} for g in self.param_groups
        ]
        with _hooks_set_aside(
            self, "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks"
        ) as (_, post_hooks):
            super().load_state_dict(state_dict)
        for group, saved, options, keywords in zip(
            self.param_groups, state_dict["param_groups"], ours, implementation
        ):
            for key, value in options.items():
                if key not in saved:
                    group[key] = value
            # Note [implementation keywords on load]
            group.update(keywords)
        self._plan = None
        self._normalize_state(state_dict)
        for hook in post_hooks.values():
            hook(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        if not isinstance(self.state, OptimizerState):
            self.state = OptimizerState(self.state)
        for group in self.param_groups:
            for key, value in PRECISION_DEFAULTS.items():
                group.setdefault(key, value)
        self._plan = None
        if _torch_path.uses_torch_path(self.defaults):
            self._step_supports_amp_scaling = False

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_plan", None)
        return state

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            self._traced_step()
            return loss
        if type(self.state) is not OptimizerState:
            # (replaced by the user or a wrapper: see _state.py)
            self.state = OptimizerState(self.state)
        journal = Journal(self.state)
        try:
            self._step(journal)
        except BaseException:
            # Note [validate before mutating]: take back what this step
            # changed before it raised (state made, precision conversions).
            journal.undo()
            self._plan = None
            raise
        return loss

    # ----- the step ---------------------------------------------------------------

    def _step(self, journal: Journal) -> None:
        plan, cached = self._current_plan(journal)
        if any(p.grad is not None for p in plan.stateless):
            plan, cached = self._build_plan(journal), False
        progress = {"written": False}
        try:
            self._apply(plan, progress)
        except RuntimeError:
            if progress["written"] or not cached:
                raise
            # Note [stale plans]: a cached plan whose call is refused may
            # predate a change to a param (its dtype, device or memory)
            # that the plan's signature does not see. Nothing was written:
            # plan afresh and try once more; a real error raises again.
            self._apply(self._build_plan(journal), progress)

    # Note [stale plans]
    # The plan is cached on what can be checked in O(groups) per step (the
    # groups, their options, the number of params with state). A param
    # changed behind the optimizer's back (``p.data = p.data.double()``,
    # ``model.to(...)``, a param rebound to other memory) is not seen there;
    # it is seen by the op, which refuses a call whose tensors do not fit
    # together (dtype, device, shape, overlap) before writing anything. A
    # refused call of a cached plan therefore rebuilds the plan and runs
    # again. Checking every param's dtype each step would cost about as
    # much as the rest of a small step.

    def _apply(self, plan: Plan, progress: dict) -> None:
        """Validates every call of ``plan`` (and the groups stepped by
        torch's code) before the first write, then makes them; sets
        ``progress["written"]`` before writing."""
        torch_groups = [
            (gi, g) for gi, g in enumerate(self.param_groups) if _torch_path.uses_torch_path(g)
        ]
        for gi, group in torch_groups:
            self._check_torch_group(gi, group)
        hyper = self._hyperparameter_lists()
        lr_tensors = self._lr_tensors()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        calls = []
        for bucket in plan.buckets:
            grads, complete = _bucket.gather_grads(bucket.params)
            if not complete:
                bucket, grads = _bucket.select(bucket, grads)
            if bucket.params:
                # Only buckets that are stepped need kernels: torch.optim
                # skips gradient-less params whatever their device.
                require_device_supported(bucket.device, type(self).__name__)
                calls.append((bucket, grads))
        amp_on_device = {}  # device -> (grad_scale, found_inf) there

        def extras(bucket: Bucket) -> OpExtras:
            amp = amp_on_device.get(bucket.device)
            if amp is None:
                amp = amp_on_device[bucket.device] = tuple(
                    None if t is None else t.to(bucket.device, non_blocking=True)
                    for t in (grad_scale, found_inf)
                )
            return OpExtras(
                bucket.master_params(),
                lr_tensors,
                *amp,
                bucket.precision.stochastic_rounding,
            )

        prepared = None  # [(dense call or None, sparse parts)], all validated
        if len(calls) > 1 or torch_groups:
            # Note [validate before mutating]: every call is checked (the
            # op's own checks, Note [validate only]) before any writes.
            prepared = [self._prepare(bucket, grads, hyper, extras) for bucket, grads in calls]
        sparse = []
        skipped = None  # whether AMP skipped this step, if asked
        try:
            if prepared is None and calls:
                # One call: the op checks everything before it writes, so
                # it is its own validation (no second pass over the lists).
                bucket, grads = calls[0]
                try:
                    self._launch(bucket, grads, hyper, extras(bucket))
                    progress["written"] = True
                except RuntimeError:
                    # Nothing was written. Sparse gradients land here too:
                    # finding them up front would cost a Python check per
                    # tensor per step.
                    prepared = [self._prepare(bucket, grads, hyper, extras)]
            for dense, sparse_here in prepared or ():
                progress["written"] = True
                if dense is not None:
                    self._launch(*dense, hyper, extras(dense[0]))
                sparse += sparse_here
        finally:
            for bucket in plan.buckets:
                if bucket.new_state and found_inf is not None:
                    # State made for a step that AMP skipped is still new
                    # (SGD's first momentum step must take the gradient as
                    # is). Read only in a param's first step: no sync after.
                    if skipped is None:
                        skipped = bool(found_inf.item())
                    if skipped:
                        continue
                bucket.new_state.clear()
        progress["written"] = True
        for group, params, grads, is_new in sparse:
            self._sparse_step(group, params, grads, is_new)
        if torch_groups:
            _torch_path.torch_step(self, [group for _, group in torch_groups])

    def _prepare(self, bucket: Bucket, grads: list, hyper: list, extras) -> tuple:
        """Checks one call without writing anything: returns (the dense call
        or None, [(group, params, grads, is_new)] of its sparse gradients),
        or raises, naming the group and param where it can."""
        try:
            self._launch(bucket, grads, hyper, extras(bucket), validate=True)
            return (bucket, grads), []
        except RuntimeError:
            if not (self._supports_sparse and any(g.is_sparse for g in grads)):
                self._check_call(bucket, grads)  # a friendlier message
                raise
        dense, sparse = self._split_sparse(bucket, grads)
        if dense is not None:
            try:
                self._launch(*dense, hyper, extras(dense[0]), validate=True)
            except RuntimeError:
                self._check_call(*dense)
                raise
        return dense, sparse

    def _check_torch_group(self, gi: int, group) -> None:
        """Validates a group that torch.optim's step will update, before
        anything is written (torch's own checks run again inside)."""
        check_torch_path_precision(type(self).__name__, group)
        for pi, param in enumerate(group["params"]):
            if param.grad is not None:
                self._check_grad(gi, pi, param, param.grad)

    def _op_lists(self, bucket: Bucket, grads: list) -> tuple[list, list, list]:
        """(params, grads, [state list per name]) as the op takes them:
        complex tensors as real views, like torch.optim's view_as_real."""
        params = bucket.params
        states = bucket.state_lists()
        if bucket.is_complex:
            params = _bucket.as_real(params)
            grads = _bucket.as_real(grads)
            states = [_bucket.as_real(s) for s in states]
        return params, grads, states

    def _hyperparameter_lists(self) -> list:
        per_group = [self._hyperparameters(g) for g in self.param_groups]
        return [list(values) for values in zip(*per_group)]

    def _lr_tensors(self) -> list:
        """The groups' lr tensors for the op to read on the device: all of
        them when every group's lr is a tensor on an accelerator, else none
        (then the lrs go as floats; see _lr)."""
        lrs = [g["lr"] for g in self.param_groups]
        on_device = [isinstance(lr, torch.Tensor) and lr.device.type != "cpu" for lr in lrs]
        if all(on_device):
            return lrs
        if any(on_device):
            raise ValueError(
                f"fused_optim.{type(self).__name__}: some param groups have their lr as a "
                "tensor on an accelerator and others not; give every group's lr as a tensor "
                "on the params' device (read by the kernel, capturable) or none"
            )
        return []

    def _split_sparse(self, bucket: Bucket, grads: list):
        """Splits one call into (its dense part or None, [(group, params,
        grads, is_new)] of its sparse part), validating both before either
        runs."""
        self._check_sparse_options(bucket)
        dense = [None if g.is_sparse else g for g in grads]
        new_state = set(bucket.new_state)
        by_group = {}
        for i, g in enumerate(grads):
            if g.is_sparse:
                gi, pi = bucket.positions[i]
                group = self.param_groups[gi]
                self._check_grad(gi, pi, bucket.params[i], g)
                self._check_sparse(group, bucket.params[i], g)
                entry = by_group.setdefault(gi, (group, [], [], []))
                entry[1].append(bucket.params[i])
                entry[2].append(g)
                entry[3].append(i in new_state)
        sub, sub_grads = _bucket.select(bucket, dense)
        if not sub.params:
            return None, list(by_group.values())
        return (sub, sub_grads), list(by_group.values())

    def _check_sparse_options(self, bucket: Bucket) -> None:
        """Sparse gradients go through torch's unfused code, which has no
        AMP unscale, master weights or other storage precision."""
        name = type(self).__name__
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            raise RuntimeError(
                f"fused_optim.{name}: sparse gradients are not supported with torch.amp.GradScaler"
            )
        if bucket.precision != Precision(False, bucket.dtype, False):
            raise RuntimeError(
                f"fused_optim.{name}: sparse gradients are not supported with "
                "master_weights, state_dtype or stochastic_rounding"
            )

    def _check_call(self, bucket: Bucket, grads: list) -> None:
        """Python-side validation of one call, with messages that name the
        param group and the param. Mirrors the op's own checks."""
        for i, (param, grad) in enumerate(zip(bucket.params, grads)):
            gi, pi = bucket.positions[i]
            self._check_grad(gi, pi, param, grad)
            if grad.is_sparse:
                self._check_sparse_options(bucket)
                self._check_sparse(self.param_groups[gi], param, grad)

    def _check_grad(self, gi: int, pi: int, param, grad) -> None:
        """Raises if ``grad`` cannot update ``param`` (param ``pi`` of group
        ``gi``): sparse where unsupported, or a layout, dtype, shape or
        device that differs from the param's."""
        name = type(self).__name__
        where = f"param {pi} of param group {gi}"
        if grad.is_sparse and not self._supports_sparse:
            raise RuntimeError(
                f"fused_optim.{name} does not support sparse gradients ({where})"
                + (", please consider SparseAdam instead" if "Adam" in name else "")
            )
        for mismatch in (
            not grad.is_sparse and grad.layout != torch.strided
            and f"has layout {grad.layout}; only dense gradients are supported",
            grad.dtype != param.dtype
            and f"has dtype {grad.dtype} but the param has dtype {param.dtype}",
            grad.shape != param.shape
            and f"has shape {tuple(grad.shape)} but the param has shape {tuple(param.shape)}",
            grad.device != param.device
            and f"is on {grad.device} but the param is on {param.device}",
        ):
            if mismatch:
                raise RuntimeError(f"fused_optim.{name}: the gradient of {where} {mismatch}")

    # ----- planning -----------------------------------------------------------

    def _current_plan(self, journal: Journal) -> tuple[Plan, bool]:
        """(the plan, whether it is the cached one)."""
        plan = self._plan
        if (
            plan is None
            or plan.signature != _bucket.groups_signature(self, self._group_key)
            or not plan.same_params(self.param_groups)
        ):
            return self._build_plan(journal), False
        return plan, True

    def _build_plan(self, journal: Journal) -> Plan:
        """Buckets every param that has state, creating state for params that
        got a gradient. Devices and dtypes are validated here, before the
        first op call."""
        buckets: dict = {}
        stateless = []
        for gi, group in enumerate(self.param_groups):
            if _torch_path.uses_torch_path(group):
                continue  # stepped by torch.optim's code (_torch_path.py)
            mode = self._mode(group)
            names = self._state_names(mode)
            for pi, param in enumerate(group["params"]):
                state = self.state[param] if param in self.state else None
                has_grad = param.grad is not None
                if not has_grad and not state:
                    stateless.append(param)
                    continue
                if has_grad:
                    # (torch.optim skips gradless params whatever they are)
                    self._check_param(param, group, gi, pi)
                precision = precision_of(group, real_dtype(param))
                if has_grad:
                    state, is_new = self._ready_state(param, group, precision, journal)
                else:
                    is_new = False
                    self._conform_state(param, group, precision, state, journal)
                key = (param.device, param.dtype, mode, precision)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = Bucket(
                        param.device,
                        param.dtype,
                        mode,
                        state_names=names,
                        has_step=self._keeps_step(group),
                        precision=precision,
                    )
                if is_new:
                    bucket.new_state.append(len(bucket.params))
                bucket.params.append(param)
                bucket.state_dicts.append(state)
                bucket.group_index.append(gi)
                bucket.positions.append((gi, pi))
        plan = Plan(
            list(buckets.values()),
            stateless,
            _bucket.groups_signature(self, self._group_key),
            [tuple(group["params"]) for group in self.param_groups],
        )
        self._plan = plan
        return plan

    def _check_param(self, param, group, gi, pi) -> None:
        name = type(self).__name__
        where = f"fused_optim.{name}: param {pi} of param group {gi}"
        if not (param.is_floating_point() or param.is_complex()):
            raise ValueError(
                f"{where} has dtype {param.dtype}; only floating point and complex "
                "params are supported"
            )
        if param.is_complex() and param.dtype == torch.complex32:
            raise ValueError(f"{where} is complex32, which is not supported")
        require_device_supported(param.device, name)
        state_dtype = group.get("state_dtype")
        real = real_dtype(param)
        if state_dtype is not None and state_dtype != real and (
            param.is_complex() or real == torch.float64
        ):
            raise ValueError(
                f"{where} has dtype {param.dtype}, whose state stays in {real}; "
                f"state_dtype={state_dtype} is for float32, float16 and bfloat16 params"
            )
        if group.get("stochastic_rounding") and real == torch.float16:
            raise ValueError(
                f"{where} is float16: stochastic_rounding is implemented for bfloat16 "
                "params (use master_weights=True for float16)"
            )

    def _ready_state(self, param, group, precision: Precision, journal: Journal) -> tuple[dict, bool]:
        """The state of a param about to be stepped: missing state created
        (``_init_state``) and all of it brought to the group's precision
        options (``_conform_state``), through ``journal``. Returns (its
        state dict, whether the op must treat the state as new)."""
        state = self.state[param] if param in self.state else {}
        is_new = False
        if self._needs_state_for(group, state, precision):
            state = journal.state_for(param)
            is_new = self._init_state(param, group, state, state_dtype_of(param, precision))
        self._conform_state(param, group, precision, state, journal)
        return state, is_new

    def _conform_state(self, param, group, precision: Precision, state, journal: Journal) -> None:
        """Brings a param's existing state to the group's precision options:
        state tensors to the state dtype, the float32 master copy created
        from the param where master weights are on (a checkpoint of
        torch.optim has none) and dropped where they are off, the step
        counter to the device the op reads it on. Through ``journal``, so a
        step that then fails takes it all back."""
        dtype = state_dtype_of(param, precision)
        for key, value in list(state.items()):
            if key in ("step", "master_param") or not isinstance(value, torch.Tensor):
                continue
            if value.dtype != dtype:
                journal.set(state, key, value.to(dtype))
        if precision.master_weights:
            if "master_param" not in state:
                journal.set(state, "master_param", param.detach().to(torch.float32, copy=True))
        else:
            journal.pop(state, "master_param")
        step = state.get("step")
        if isinstance(step, torch.Tensor) and (
            step.device != _step_device(param) or not step.is_floating_point()
        ):
            # (torch accepts an integer counter, e.g. hand-edited: made float32)
            journal.set(state, "step", step.to(_step_device(param), torch.float32))

    # ----- checkpoints ----------------------------------------------------------

    def _check_state_dict(self, state_dict) -> None:
        """Rejects a state dict whose layout does not fit, before anything is
        loaded (torch checks group counts and sizes only)."""
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for group, saved in zip(groups, saved_groups):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group "
                    "that doesn't match the size of optimizer's group"
                )
        id_to_param = {}
        for group, saved in zip(groups, saved_groups):
            id_to_param.update(zip(saved["params"], group["params"]))
        for key, param_state in state_dict["state"].items():
            param = id_to_param.get(key)
            if param is None:
                continue
            for name, value in param_state.items():
                if name == "step" or not isinstance(value, torch.Tensor):
                    continue
                if value.shape != param.shape:
                    raise ValueError(
                        f"loaded state dict has state {name!r} of shape "
                        f"{tuple(value.shape)} for a param of shape {tuple(param.shape)}"
                    )

    def _normalize_state(self, state_dict) -> None:
        """After loading: torch.optim's load casts every state tensor to its
        param's dtype, which would round a float32 master copy or float32
        moments of bf16 params to bf16. Those are taken again from the
        loaded dict, at full precision. Step counters become 0-d tensors on
        the device the op reads them on: the CPU for CPU params, the param's
        device otherwise (torch keeps them there for its fused and
        capturable paths only)."""
        saved = {}
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            for param, key in zip(group["params"], saved_group["params"]):
                if key in state_dict["state"]:
                    saved[param] = (group, state_dict["state"][key])
        for param, state in self.state.items():
            if not isinstance(param, torch.Tensor) or not isinstance(state, dict):
                continue  # torch allows other entries (flags of hooks): kept as loaded
            group, source = saved.get(param, (None, {}))
            if group is not None and param.is_floating_point():
                precision = precision_of(group, param.dtype)
                for key, value in source.items():
                    loaded = state.get(key)
                    if key == "step" or not isinstance(loaded, torch.Tensor):
                        continue
                    dtype = torch.float32 if key == "master_param" else precision.state_dtype
                    if loaded.dtype != dtype and value.is_floating_point():
                        state[key] = value.to(device=loaded.device, dtype=dtype, copy=True)
            step = state.get("step")
            if step is None:
                continue
            if not isinstance(step, torch.Tensor):
                step = torch.tensor(float(step), dtype=_step_dtype())
            device = _step_device(param)
            if step.device != device or step.dtype not in (torch.float32, torch.float64):
                step = step.detach().to(device, torch.float32)
            state["step"] = step


@contextlib.contextmanager
def _hooks_set_aside(optimizer, *names: str):
    """Empties the named hook dicts of ``optimizer`` for the duration and
    yields their contents, so that the caller runs them itself at the point
    where torch.optim would (around our additions to its method)."""
    saved = tuple(getattr(optimizer, name) for name in names)
    for name in names:
        setattr(optimizer, name, OrderedDict())
    try:
        yield saved
    finally:
        for name, hooks in zip(names, saved):
            setattr(optimizer, name, hooks)


def _step_device(param) -> torch.device:
    # The CPU kernels read the counters on the host; the CUDA kernels on the
    # device (no sync for AMP's skipped steps; capturable).
    return torch.device("cpu") if param.device.type == "cpu" else param.device


def _step_dtype() -> torch.dtype:
    # torch.optim's choice (optimizer._get_scalar_dtype): float64 when the
    # default dtype is float64, else float32. Never fp16/bf16: a bf16 counter
    # freezes at 256.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step(device=None) -> torch.Tensor:
    """A new step counter: 0-d, float32 (float64 under a float64 default
    dtype, as torch.optim) on the CPU for CPU params; float32 on the
    param's device for other devices (as torch's fused optimizers)."""
    if device is None or torch.device(device).type == "cpu":
        return torch.zeros((), dtype=_step_dtype())
    return torch.zeros((), dtype=torch.float32, device=device)
