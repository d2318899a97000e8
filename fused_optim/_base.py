"""What every fused optimizer shares: the step protocol around one op call.

A subclass (see adam.py) says which state it keeps, how to create it, which
group options select a kernel (``_mode``), which hyperparameters it reads per
group, and how to call its op. This class does the bookkeeping:

1. plan: bucket the params of all groups by (device, dtype, mode), creating
   state lazily for params that got their first gradient (``_bucket.py``);
2. validate everything, for every bucket, before anything is written;
3. one op call per bucket; the op increments the step counters itself.

Note [validate before mutating]
A step that raises leaves every param and every state tensor as it was
(torch.optim does not: its Adam updates the first group before it notices a
sparse gradient in the second). The ops check all of their inputs before
writing any. With more than one bucket the second call could still fail after
the first succeeded, so then all buckets are checked here first. State
created for this step is removed again if the step fails.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from fused_optim import _bucket
from fused_optim._bucket import Bucket, Plan
from fused_optim._build import require_device_supported

def check_implementation_keywords(name: str, *, foreach, fused, capturable, differentiable):
    """Accepts the torch.optim implementation keywords that we can honour and
    rejects, clearly, those we cannot (never ignore them silently)."""
    if fused is False:
        raise ValueError(
            f"fused_optim.{name} is always fused; fused=False asks for torch's "
            f"unfused implementation: use torch.optim.{name} for that"
        )
    if fused and foreach:
        # torch.optim's own message and type for this combination
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if differentiable:
        raise ValueError(
            f"fused_optim.{name} does not support differentiable=True: the fused "
            f"step is not recorded by autograd; use torch.optim.{name}"
        )
    if capturable:
        raise ValueError(
            f"fused_optim.{name} does not support capturable=True yet (CUDA graph "
            f"capture of the step); use torch.optim.{name}(capturable=True)"
        )
    # foreach=True/False/None: an implementation hint that the fused step
    # already supersedes (it processes all tensors in one pass); accepted.


def to_float(value) -> float:
    """A hyperparameter as a Python float (torch allows 1-element tensors)."""
    return value.item() if isinstance(value, torch.Tensor) else float(value)


class FusedOptimizer(Optimizer):
    """Base class of the fused optimizers. Not for direct use."""

    # Whether the optimizer keeps a per-param ``step`` counter (SGD does not).
    _has_step = True
    # Whether sparse gradients are supported (through torch's functional API).
    _supports_sparse = False

    def __init__(self, params, defaults):
        self._plan: Plan | None = None
        super().__init__(params, defaults)

    # ----- subclass interface -------------------------------------------------

    def _mode(self, group) -> tuple:
        """Group options that select a different kernel (one call per mode)."""
        raise NotImplementedError

    def _state_names(self, mode: tuple) -> tuple:
        """Dense state tensors the op takes, in op order, for this mode."""
        raise NotImplementedError

    def _init_state(self, param, group, state: dict) -> bool:
        """Fills in a param's missing state: the step counter and a zero
        tensor per state name (torch.optim's initial state for Adam, AdamW
        and RMSprop; SGD and Adagrad override). Returns True if the op must
        treat the state as new (SGD's first momentum step)."""
        if self._has_step:
            state.setdefault("step", new_step())
        for name in self._state_names(self._mode(group)):
            if name not in state:
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return False

    def _needs_state_for(self, group, state: dict) -> bool:
        """Whether a param that has a gradient needs (more) state created:
        some state this group's mode uses is missing."""
        names = self._state_names(self._mode(group))
        return any(name not in state for name in names) or (
            self._has_step and "step" not in state
        )

    def _hyperparameters(self, group) -> tuple:
        """This group's per-group op arguments, as floats, in op order."""
        raise NotImplementedError

    def _launch(self, bucket: Bucket, grads: list, hyper: list) -> None:
        """Calls the op on one bucket. ``hyper`` holds one list per
        hyperparameter with one entry per group. The classes call the op
        through fused_optim._C.<op> (positional arguments, the op's schema):
        the same kernel as torch.ops.fused_optim.<op>, with a cheaper
        crossing for thousands of tensors (csrc/python_module.cpp, Note
        [fast op call])."""
        raise NotImplementedError

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

    def load_state_dict(self, state_dict):
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._plan = None
        self._normalize_state()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plan = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_plan", None)
        return state

    @torch.no_grad()
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
        created = []  # (param, state keys it had before, or None)
        try:
            self._step(created)
        except BaseException:
            # Note [validate before mutating]: forget state made for this step.
            for param, previous_keys in created:
                if previous_keys is None:
                    self.state.pop(param, None)
                else:
                    state = self.state[param]
                    for key in [k for k in state if k not in previous_keys]:
                        del state[key]
            if created:
                self._plan = None
            raise
        return loss

    # ----- the step ---------------------------------------------------------------

    def _step(self, created: list) -> None:
        plan = self._current_plan()
        if any(p.grad is not None for p in plan.stateless):
            plan = self._build_plan(created)
        hyper = self._hyperparameter_lists()
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
        if len(calls) > 1:
            for bucket, grads in calls:
                self._check_call(bucket, grads)
        sparse = []
        try:
            for bucket, grads in calls:
                try:
                    self._launch(bucket, grads, hyper)
                except RuntimeError:
                    # The op wrote nothing (it validates first). Sparse
                    # gradients land here too: finding them up front would
                    # cost a Python check per tensor per step.
                    if not (self._supports_sparse and any(g.is_sparse for g in grads)):
                        # A friendlier message naming the group and param.
                        self._check_call(bucket, grads)
                        raise
                    dense, sparse_here = self._split_sparse(bucket, grads)
                    if dense is not None:
                        self._launch(*dense, hyper)
                    sparse += sparse_here
        finally:
            for bucket in plan.buckets:
                bucket.new_state.clear()
        for group, params, grads, is_new in sparse:
            self._sparse_step(group, params, grads, is_new)

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

    def _split_sparse(self, bucket: Bucket, grads: list):
        """Splits one call into (its dense part or None, [(group, params,
        grads, is_new)] of its sparse part), validating both before either
        runs."""
        dense = [None if g.is_sparse else g for g in grads]
        new_state = set(bucket.new_state)
        by_group = {}
        for i, g in enumerate(grads):
            if g.is_sparse:
                gi, _ = bucket.positions[i]
                group = self.param_groups[gi]
                self._check_sparse(group, bucket.params[i], g)
                entry = by_group.setdefault(gi, (group, [], [], []))
                entry[1].append(bucket.params[i])
                entry[2].append(g)
                entry[3].append(i in new_state)
        sub, sub_grads = _bucket.select(bucket, dense)
        if not sub.params:
            return None, list(by_group.values())
        self._check_call(sub, sub_grads)
        return (sub, sub_grads), list(by_group.values())

    def _check_call(self, bucket: Bucket, grads: list) -> None:
        """Python-side validation of one call, with messages that name the
        param group and the param. Mirrors the op's own checks."""
        name = type(self).__name__
        for i, (param, grad) in enumerate(zip(bucket.params, grads)):
            gi, pi = bucket.positions[i]
            where = f"param {pi} of param group {gi}"
            if grad.is_sparse:
                if self._supports_sparse:
                    self._check_sparse(self.param_groups[gi], param, grad)
                    continue
                raise RuntimeError(
                    f"fused_optim.{name} does not support sparse gradients ({where})"
                    + (", please consider SparseAdam instead" if "Adam" in name else "")
                )
            for mismatch in (
                grad.layout != torch.strided
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

    def _current_plan(self) -> Plan:
        plan = self._plan
        if plan is None or plan.signature != _bucket.groups_signature(self, self._mode):
            plan = self._build_plan([])
        return plan

    def _build_plan(self, created: list) -> Plan:
        """Buckets every param that has state, creating state for params that
        got a gradient. Devices and dtypes are validated here, before the
        first op call."""
        buckets: dict = {}
        stateless = []
        for gi, group in enumerate(self.param_groups):
            mode = self._mode(group)
            names = self._state_names(mode)
            for pi, param in enumerate(group["params"]):
                state = self.state[param] if param in self.state else None
                has_grad = param.grad is not None
                is_new = False
                if has_grad:
                    self._check_param(param, gi, pi)
                    if self._needs_state_for(group, state or {}):
                        created.append((param, None if state is None else set(state)))
                        state = self.state[param]
                        is_new = self._init_state(param, group, state)
                if not has_grad and not state:
                    stateless.append(param)
                    continue
                state = state if state is not None else {}
                key = (param.device, param.dtype, mode)
                bucket = buckets.get(key)
                if bucket is None:
                    bucket = buckets[key] = Bucket(
                        param.device, param.dtype, mode, state_names=names, has_step=self._has_step
                    )
                if is_new:
                    bucket.new_state.append(len(bucket.params))
                bucket.params.append(param)
                bucket.state_dicts.append(state)
                bucket.group_index.append(gi)
                bucket.positions.append((gi, pi))
        plan = Plan(list(buckets.values()), stateless, _bucket.groups_signature(self, self._mode))
        self._plan = plan
        return plan

    def _check_param(self, param, gi, pi) -> None:
        name = type(self).__name__
        if not (param.is_floating_point() or param.is_complex()):
            raise ValueError(
                f"fused_optim.{name}: param {pi} of param group {gi} has dtype "
                f"{param.dtype}; only floating point and complex params are supported"
            )
        if param.is_complex() and param.dtype == torch.complex32:
            raise ValueError(
                f"fused_optim.{name}: param {pi} of param group {gi} is complex32, "
                "which is not supported"
            )
        require_device_supported(param.device, name)

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

    def _normalize_state(self) -> None:
        """After loading: step counters become 0-d CPU tensors (torch keeps
        them on the param's device for its fused/capturable paths; our ops
        read them on the host)."""
        if not self._has_step:
            return
        for state in self.state.values():
            step = state.get("step")
            if step is None:
                continue
            if not isinstance(step, torch.Tensor):
                state["step"] = torch.tensor(float(step), dtype=_step_dtype())
            elif step.device.type != "cpu" or step.dtype not in (torch.float32, torch.float64):
                state["step"] = step.detach().to("cpu", torch.float32)


def _step_dtype() -> torch.dtype:
    # torch.optim's choice (optimizer._get_scalar_dtype): float64 when the
    # default dtype is float64, else float32. Never fp16/bf16: a bf16 counter
    # freezes at 256.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def new_step() -> torch.Tensor:
    return torch.zeros((), dtype=_step_dtype())
