"""Planning a step (a mixin of FusedOptimizer): the buckets of every param
that has state, the state created for params that got their first
gradient, and the state brought to the group's precision options, all
through the step's journal (_bucket.py says what a plan caches)."""

from __future__ import annotations

import numbers

import torch

from fused_optim import _arena, _bucket
from fused_optim._build import require_device_supported
from fused_optim._dtensor import is_dtensor
from fused_optim._bucket import Bucket, Plan, Precision
from fused_optim._group_options import GroupOptions
from fused_optim._journal import Journal
from fused_optim._keywords import check_group_precision
from fused_optim._precision import (
    as_state_dtype, dense_state, is_legal_storage, precision_of, precision_reads_state, real_dtype,
    state_dtype_of,
)


class Planning:
    """Builds and caches the step's plan (see the module docstring)."""

    # Note [a loaded master copy]
    # A master copy is the truth only while the param is its rounding, as
    # every step leaves them. Between steps that can break:
    # - a checkpoint: ours, saved with master weights, then stepped by
    #   torch.optim (which keeps the unused float32 "master_param" as it
    #   was, in the param's dtype, and saves it again), holds a master
    #   several steps behind its params; stepping from it would throw
    #   torch's steps away;
    # - a master made before the model's weights are written: Adagrad's,
    #   made at construction with the rest of its state (as torch's
    #   Adagrad, so that a fresh optimizer's state_dict, the template
    #   torch.distributed.checkpoint loads into, lists them), or one made
    #   by a step taken to create state (DCP's template step, lr 0 and zero
    #   gradients, or a user's) before pretrained weights are loaded.
    # So such masters (loaded, made at construction, made by the last
    # step) are unchecked until the next eager step, which first compares
    # each, rounded, with its param, and where they differ makes the master
    # from the param, as for a torch.optim checkpoint (_check_masters): one
    # comparison per master, once. A write into the params after that is
    # undone by the next step, as documented (the master is the truth). A
    # step traced by torch.compile does not check (a data-dependent branch
    # in the graph): an eager step after such a load, or deleting the
    # checkpoint's "master_param"s, does it. A step that fails or that AMP
    # skips checks again next time. The params whose master is unchecked:
    _unchecked_masters: set | frozenset = frozenset()

    def _check_masters(self, journal: Journal) -> None:
        """Remakes from its param each unchecked master copy that does not
        round to it, through ``journal`` (Note [a loaded master copy])."""
        for param in self._unchecked_masters:
            state = self.state.get(param)
            master = state.get("master_param") if isinstance(state, dict) else None
            if master is not None and _is_stale(master, param):
                journal.set(state, "master_param", param.detach().to(torch.float32, copy=True))

    def _current_plan(self, journal: Journal) -> tuple[Plan, bool]:
        """(the plan, whether it is the cached one)."""
        plan = self._plan
        if plan is None:
            return self._build_plan(journal), False
        groups = self.param_groups
        if not (plan.options.unchanged(groups) and plan.state_unchanged(self.state)):
            # Something changed since the last check (Note [group options]):
            # the raw options the buckets derive from, read at C speed.
            raw = self._raw_signature()
            if raw is None or raw != plan.raw_signature:
                # An option changed that may not change a bucket (a momentum
                # schedule): the derived keys decide.
                if plan.signature != _bucket.groups_signature(self, self._group_key):
                    return self._build_plan(journal), False
                plan.raw_signature = raw
            plan.options = GroupOptions(groups)
        if not plan.same_params(groups):
            return self._build_plan(journal), False
        return plan, True

    def _raw_signature(self) -> tuple | None:
        """The plan's signature over the raw group options (C-speed reads),
        or None if a group lacks one of them."""
        try:
            return _bucket.groups_signature(self, self._raw_group_key)
        except KeyError:
            return None

    # Note [a first gradient's short way]
    # A first step's host time is nearly all per param (measured on 2,000
    # params: checks, state, buckets, each a few microseconds). What a plan
    # decides for a param without state (whether the checks pass, its
    # precision, the state it needs, its bucket) depends only on its group,
    # dtype and device, so a group decides it once per (dtype, device), and
    # such a param then costs its state and a few appends. Params with
    # state take the long way, each judged on its own (its state may be in
    # another dtype, lack a mode's tensor, hold a master copy, ...); the
    # verdict of the checks, which reads no state, is shared there too.

    def _build_plan(self, journal: Journal) -> Plan:
        """Buckets every param that has state, creating state for params that
        got a gradient. Devices and dtypes are validated here, before the
        first op call."""
        self._find_groups_listing_a_param_twice()
        buckets: dict = {}
        unready = []  # params without the state their group needs, and no gradient
        new_tensors = []  # (state dict, names, _arena.NewTensor): the state to make
        states = self.state
        for gi, group in enumerate(self.param_groups):
            # (a group edited since it was added: the constructor's checks;
            # a precision option is in the plan's key, so an edit comes here)
            check_group_precision(type(self).__name__, group, self._takes_caution)
            if self._unfused(group):
                continue  # stepped by torch.optim's code (_torch_path.py)
            mode = self._mode(group)
            names = self._state_names(mode)
            kinds: dict = {}  # (dtype, device) -> _Kind (Note above)
            for pi, param in enumerate(group["params"]):
                state = states.get(param)
                has_grad = param.grad is not None
                if not (state or has_grad):
                    unready.append(param)
                    continue
                kind = kinds.get((param.dtype, param.device))
                if kind is None:
                    kind = kinds[param.dtype, param.device] = _Kind(self, param, group, names)
                if not kind.checked:
                    if has_grad:
                        self._check_param(param, group, gi, pi)  # (raises, naming it)
                        kind.checked = True
                    elif kind.refused is None:
                        kind.refused = not self._passes_checks(param, group, gi, pi)
                        kind.checked = not kind.refused
                if kind.refused and not has_grad:
                    # torch.optim skips gradless params whatever they are; a
                    # param the checks refuse that has state (Adagrad's, made
                    # when built) waits unready, so that its first gradient
                    # plans afresh and the checks refuse it then, not a
                    # cached plan that never checked it
                    unready.append(param)
                    continue
                precision, is_new = kind.precision, False
                if not state:  # a first gradient's short way
                    if kind.needs_state:
                        state = journal.state_for(param)
                        is_new = self._init_state(param, group, state, kind.state_dtype, names,
                                                  new_tensors)
                        if precision.master_weights:
                            _make_master(param, state, journal)
                    elif state is None:
                        state = {}  # (none kept, as torch.optim keeps none: SGD without momentum)
                else:
                    if kind.reads_state:  # (Note [state kept wide])
                        precision = precision_of(group, real_dtype(param),
                                                 dense_state(state, names))
                    if has_grad:
                        state, is_new = self._ready_state(
                            param, group, precision, journal, new_tensors, names)
                    else:
                        self._conform_state(param, group, precision, state, journal)
                        if self._needs_state_for(group, state, precision, names):
                            # (a mode turned on since its last gradient, e.g.
                            # Adam's amsgrad: its gradient re-plans, as a first one)
                            unready.append(param)
                bucket = kind.buckets.get(precision)
                if bucket is None:
                    bucket = kind.buckets[precision] = self._bucket_for(
                        buckets, param, group, mode, names, precision)
                if is_new:
                    bucket.new_state.append(len(bucket.params))
                bucket.params.append(param)
                bucket.state_dicts.append(state)
                bucket.group_index.append(gi)
                bucket.positions.append((gi, pi))
        _arena.make(new_tensors)  # (Note [state arena])
        plan = Plan(
            list(buckets.values()),
            unready,
            _bucket.groups_signature(self, self._group_key),
            [tuple(group["params"]) for group in self.param_groups],
            [gi for gi, group in enumerate(self.param_groups) if self._unfused(group)],
            GroupOptions(self.param_groups),
            self._raw_signature(),
        )
        self._plan = plan
        return plan

    def _make_all_state(self) -> None:
        """Makes every param's state now, as a first gradient would, with
        the master copies unchecked (Note [a loaded master copy]); for a
        class whose torch.optim twin makes its state at construction
        (Adagrad). The state of a group stepped by torch.optim's code is
        as torch's code makes it: tensors of their own (its differentiable
        updates record history in place, which autograd refuses on the
        second view of one buffer), no master copy."""
        new_tensors = []
        journal = Journal(self.state)  # (nothing to take back: read for its new masters)
        for group in self.param_groups:
            names = self._state_names(self._mode(group))
            fused = not self._unfused(group)
            kinds: dict = {}  # (dtype, device) -> _Kind
            for param in group["params"]:
                kind = kinds.get((param.dtype, param.device))
                if kind is None:
                    kind = kinds[param.dtype, param.device] = _Kind(self, param, group, names)
                state = self.state[param]
                self._init_state(param, group, state, kind.state_dtype, names,
                                 new_tensors if fused else None)
                if fused and kind.precision.master_weights and "master_param" not in state:
                    _make_master(param, state, journal)
        _arena.make(new_tensors)
        self._unchecked_masters = frozenset(journal.new_masters)

    def _bucket_for(self, buckets: dict, param, group, mode: tuple, names: tuple,
                    precision: Precision) -> Bucket:
        """The bucket of ``buckets`` that takes ``param``, made if new."""
        key = (param.device, param.dtype, mode, precision)
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = Bucket(
                param.device,
                param.dtype,
                mode,
                state_names=names,
                has_step=self._keeps_step(group),
                scalar_state_names=self._scalar_state_names,
                precision=precision,
            )
        return bucket

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
        require_device_supported(param.device, param.dtype, name)
        state_dtype = as_state_dtype(group.get("state_dtype"))
        real = real_dtype(param)
        if state_dtype is not None and state_dtype != real and (
            param.is_complex() or not is_legal_storage(real, precision_of(group, real))
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

    def _passes_checks(self, param, group, gi, pi) -> bool:
        """Whether ``_check_param`` takes ``param`` (it raises otherwise)."""
        try:
            self._check_param(param, group, gi, pi)
        except (ValueError, RuntimeError):
            return False
        return True

    def _ready_state(self, param, group, precision: Precision, journal: Journal,
                     new_tensors: list | None = None, names: tuple | None = None,
                     ) -> tuple[dict, bool]:
        """The state of a param about to be stepped: missing state created
        (``_init_state``) and all of it brought to the group's precision
        options (``_conform_state``), through ``journal``. Returns (its
        state dict, whether the op must treat the state as new). With
        ``new_tensors``, its new state tensors are appended there for the
        arena to make (``_arena.make``) instead of made now. ``names``: the
        group's mode's state names, where the caller has them."""
        if names is None:
            names = self._state_names(self._mode(group))
        state = self.state.get(param)
        if state is None:
            state = {}
        is_new = False
        if self._needs_state_for(group, state, precision, names):
            state = journal.state_for(param)
            for name in names:
                if name in state and state[name] is None:
                    journal.pop(state, name)  # (made anew; a failed step restores the None)
            is_new = self._init_state(param, group, state, state_dtype_of(param, precision),
                                      names, new_tensors)
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
            if key in self._state_kept_as_is or not isinstance(value, torch.Tensor):
                continue
            if value.dtype != dtype:
                journal.set(state, key, value.to(dtype))
        if precision.master_weights:
            if state.get("master_param") is None:
                _make_master(param, state, journal)
        elif "master_param" in state:
            journal.pop(state, "master_param")
        for key in ("step", *self._scalar_state_names):
            value = state.get(key)
            readable = counter_for_op(value, step_device(param))
            if readable is not value:
                journal.set(state, key, readable)



class _Kind:
    """What a plan decides once for the params of a group of one (dtype,
    device) (Note [a first gradient's short way]): their precision where
    they have no state (and, but for fp16/bf16 params, where they have:
    reads_state), their state dtype, whether a param without state needs
    some made, their bucket by precision, and what the checks said:
    ``checked`` once they passed, ``refused`` once they refused a gradless
    one (None while unknown)."""

    __slots__ = ("precision", "state_dtype", "needs_state", "reads_state", "buckets", "checked",
                 "refused")

    def __init__(self, optimizer, param, group, names: tuple) -> None:
        dtype = real_dtype(param)
        self.precision = precision_of(group, dtype)
        self.state_dtype = state_dtype_of(param, self.precision)
        self.needs_state = optimizer._needs_state_for(group, {}, self.precision, names)
        self.reads_state = precision_reads_state(dtype)
        self.buckets: dict = {}  # precision -> the plan's bucket
        self.checked = False
        self.refused = None


def _make_master(param, state: dict, journal: Journal) -> None:
    """Makes ``state``'s float32 master copy of ``param``, through
    ``journal`` (checked at the next step: Note [a loaded master copy])."""
    journal.set(state, "master_param", param.detach().to(torch.float32, copy=True))
    journal.new_masters.append(param)


def _is_stale(master, param) -> bool:
    """Whether ``param`` is not ``master`` rounded to its dtype (what a step
    leaves); DTensors compared shard by shard. A master of another shape or
    device is not judged (False): the op's checks refuse it with a clear
    error. Not while tracing (a data-dependent branch): False there."""
    if torch.compiler.is_compiling():
        return False
    master, param = (t.to_local() if is_dtensor(t) else t for t in (master, param.detach()))
    if master.shape != param.shape or master.device != param.device:
        return False
    return not torch.equal(master.to(param.dtype), param)


_CPU = torch.device("cpu")


def step_device(param) -> torch.device:
    # The CPU kernels read the counters on the host; the CUDA kernels on the
    # device (no sync for AMP's skipped steps; capturable).
    return _CPU if param.is_cpu else param.device


def step_dtype() -> torch.dtype:
    # torch.optim's choice (optimizer._get_scalar_dtype): float64 when the
    # default dtype is float64, else float32. Never fp16/bf16: a bf16 counter
    # freezes at 256.
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def counter_for_op(value, device: torch.device):
    """A param's step counter (or per-param scalar state, NAdam's
    mu_product) as the op reads it: a one-element float32 or float64 tensor
    on ``device`` (the op's: ``step_device(param)``). ``value`` itself where
    it is one (any shape: torch.optim reads counters with ``.item()``, and
    a shape-[1] counter in shared memory, as A3C's shared Adam makes, must
    stay the one the other processes see); a float32 copy of a tensor of
    another dtype or device (torch accepts an integer counter, e.g.
    hand-edited; a checkpoint loaded by torch.optim's rules may hold
    mu_product in the param's dtype); a new counter holding a number
    (torch.optim's step refuses a number, "API has changed"; ours counts
    on). None, and anything else, as it is: the op's checks refuse what it
    cannot read."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Real):
        return new_step(device).fill_(float(value))
    if isinstance(value, torch.Tensor) and value.numel() == 1 and (
        value.device != device or value.dtype not in (torch.float32, torch.float64)
    ):
        return value.detach().to(device, torch.float32)
    return value


def new_step(device=None) -> torch.Tensor:
    """A new step counter: 0-d, float32 (float64 under a float64 default
    dtype, as torch.optim) on the CPU for CPU params; float32 on the
    param's device for other devices (as torch's fused optimizers)."""
    if device is None or torch.device(device).type == "cpu":
        return torch.zeros((), dtype=step_dtype())
    return torch.zeros((), dtype=torch.float32, device=device)

