"""The step protocol of every fused optimizer (a mixin of FusedOptimizer):
plan, validate every call, then make them; one op call per bucket.

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

import functools

import torch
from torch.optim.optimizer import (
    Optimizer,
    _global_optimizer_post_hooks,
    _global_optimizer_pre_hooks,
    _use_grad_for_differentiable,
)

from fused_optim import _arena, _bucket, _clip, _dtensor, _ops, _torch_path
from fused_optim._build import require_device_supported
from fused_optim._bucket import Bucket, Plan, Precision
from fused_optim._journal import Journal
from fused_optim._keywords import (
    check_group_lr,
    check_torch_path_precision,
    chosen_fused_only_options,
    to_float,
)
from fused_optim._kept_calls import KeptCalls
from fused_optim._ops import GroupArguments, OpCall, OpExtras
from fused_optim._state import OptimizerState


# Note [lean step wrapper]
# torch.optim wraps every Optimizer subclass's ``step`` (profile_hook_step)
# in a record_function span and loops over the step hooks. On a small model
# that costs about 15 us a step, as much as the whole rest of our step, even
# with no profiler and no hook. Our wrapper runs torch's own wrapper whenever
# it would do anything (a step hook registered, globally or on this
# optimizer, a profiler recording, a torch.compile trace, or a dispatch mode
# such as make_fx's, whose graph records the span) and calls the step
# directly otherwise: the same behaviour, without the cost when there is
# nothing to do.
def lean_step_wrapper(step):
    """``step`` wrapped for hooks and the profiler as torch.optim does, but
    only when there are any (Note [lean step wrapper])."""
    torch_wrapper = Optimizer.profile_hook_step(step)
    # (past grad_mode_as_torch, which does nothing when not traced)
    eager_step = getattr(step, "eager_step", step)

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        optimizer = args[0]
        if (
            torch.compiler.is_compiling()  # (first: Dynamo cannot trace the profiler query)
            or _global_optimizer_pre_hooks
            or _global_optimizer_post_hooks
            or optimizer._optimizer_step_pre_hooks
            or optimizer._optimizer_step_post_hooks
            or torch._C._autograd._profiler_enabled()
            or torch._C._len_torch_dispatch_stack()
        ):
            return torch_wrapper(*args, **kwargs)
        return eager_step(*args, **kwargs)

    wrapper.hooked = True
    return wrapper


def grad_mode_as_torch(step):
    """``step`` wrapped where torch.optim wraps its steps in
    ``_use_grad_for_differentiable``, so that ``opt.step.__wrapped__`` is
    this wrapper and ``.__wrapped__`` again the step itself, as torch's
    (its compiled-optimizer tests compile that with fullgraph=True, grad
    mode set by the caller). Traced, the step in the ``differentiable``
    option's grad mode between torch's graph breaks (``_compiled_step``);
    eager, the step itself, which sets grad mode at less cost."""

    @functools.wraps(step)
    def wrapper(self, closure=None):
        if torch.compiler.is_compiling():
            return self._compiled_step(closure)
        return step(self, closure)

    wrapper.eager_step = step  # (what lean_step_wrapper calls when nothing is traced)
    return wrapper


class StepProtocol:
    """``step()`` and what it runs (see the module docstring)."""

    def _patch_step_function(self) -> None:
        # (torch.optim calls this from __init__ and __setstate__)
        if not getattr(type(self).step, "hooked", None):
            type(self).step = lean_step_wrapper(type(self).step)
        super()._patch_step_function()  # the zero_grad profile name; step is hooked

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Note [lean step wrapper], for zero_grad: torch.optim's opens a
        # record_function span whether or not a profiler records, 12 us of
        # a zero_grad for one param against 0.5 for the loop alone, which a
        # tiny model, or an optimizer per param stepped in backward, pays
        # every step. torch's own runs whenever it would do more than drop
        # the gradients: zeroing them (set_to_none=False), or where the span
        # is seen (a profiler recording, a torch.compile trace, a dispatch
        # mode such as make_fx's).
        if (
            not set_to_none
            or torch.compiler.is_compiling()  # (first: Dynamo cannot trace the profiler query)
            or torch._C._autograd._profiler_enabled()
            or torch._C._len_torch_dispatch_stack()
        ):
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None

    zero_grad.__doc__ = Optimizer.zero_grad.__doc__

    @grad_mode_as_torch
    def step(self, closure=None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        if torch.compiler.is_compiling():
            # (traced past grad_mode_as_torch: the caller set grad mode)
            return self._traced_step_with_closure(closure)
        return self._eager_step(closure)

    def _eager_step(self, closure=None):
        """The step when nothing traces it: plans, validates, makes the
        op calls (the module docstring)."""
        # Grad mode as torch.optim's _use_grad_for_differentiable sets it
        # (the graph breaks it adds matter only to a traced step).
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(self.defaults.get("differentiable", False))  # (Lion has none)
        try:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
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
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)

    def _compiled_step(self, closure=None):
        """The step under torch.compile (Note [traced step] in _traced.py),
        under torch's _use_grad_for_differentiable (grad mode and graph
        breaks), or, for a class without a ``differentiable`` keyword (Lion,
        Lars, Lamb: the decorator reads it), with grad mode off and the same
        graph breaks."""
        if "differentiable" in self.defaults:
            return self._compiled_step_differentiable(closure)
        import torch._dynamo

        grad_was_enabled = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            torch._dynamo.graph_break()
            return self._traced_step_with_closure(closure)
        finally:
            torch._dynamo.graph_break()
            torch.set_grad_enabled(grad_was_enabled)

    @_use_grad_for_differentiable
    def _compiled_step_differentiable(self, closure=None):
        return self._traced_step_with_closure(closure)

    def _traced_step_with_closure(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_torch_groups()
        self._traced_step()
        return loss

    def _step(self, journal: Journal) -> None:
        if self._unchecked_masters:
            self._check_masters(journal)
        plan, cached = self._current_plan(journal)
        if plan.unready and any(p.grad is not None for p in plan.unready):
            plan, cached = self._build_plan(journal), False
        progress = {"written": False}
        try:
            self._apply(plan, progress, journal)
        except (RuntimeError, TypeError):
            if progress["written"] or not cached:
                raise
            # Note [stale plans]: a cached plan whose call is refused may
            # predate a change to a param (its dtype, device or memory) or
            # to a value in its state dict (a number as its step counter)
            # that the plan's signature does not see. Nothing was written:
            # plan afresh and try once more; a real error raises again.
            self._apply(self._build_plan(journal), progress, journal)
        if journal and self._skipped_by_amp():
            # Note [a step AMP skips makes no state]
            journal.undo()
            self._plan = None
            return
        if self._unchecked_masters or journal.new_masters:
            # (checked; those this step made, at the next: Note [a loaded master copy])
            self._unchecked_masters = frozenset(journal.new_masters)

    # Note [a step AMP skips makes no state]
    # torch.optim's step is not called at all on a step that GradScaler
    # skips (an inf or NaN in the gradients); ours is, with found_inf set,
    # and the kernels then write nothing. State that the step made (a
    # param's first state) or converted is taken back, so the optimizer is
    # as torch.optim's would be: the next step makes it afresh, and a
    # checkpoint saved in between has torch's state. It matters beyond the
    # layout: SGD's (and Lars's) first momentum step takes the gradient as
    # the buffer, which a zero buffer kept from the skipped step would not
    # do (with dampening). Reading found_inf syncs with the device, only in
    # a step that made or converted state.
    def _skipped_by_amp(self) -> bool:
        found_inf = getattr(self, "found_inf", None)
        return found_inf is not None and bool(found_inf.item())

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

    def _apply(self, plan: Plan, progress: dict, journal: Journal) -> None:
        """Validates every call of ``plan`` (and the groups stepped by
        torch's code) before the first write, then makes them, torch's
        groups first; sets ``progress["written"]`` before writing.
        ``journal`` takes the state torch's code makes (_torch_step)."""
        if self._apply_kept_calls(plan, progress):
            return
        torch_groups = [(gi, self.param_groups[gi]) for gi in plan.torch_groups]
        for gi, group in torch_groups:
            self._check_torch_group(gi, group)
        group_args = self._group_arguments(frozenset(plan.torch_groups))
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        calls = []
        has_sparse = []  # per call: whether a gradient is sparse
        for bucket in plan.buckets:
            grads, complete, dense = _bucket.gather_grads(bucket.params)
            if not complete:
                bucket, grads = _bucket.select(bucket, grads)
            if bucket.params:
                # Only buckets that are stepped need kernels: torch.optim
                # skips gradient-less params whatever their device.
                require_device_supported(bucket.device, bucket.dtype, type(self).__name__)
                calls.append((bucket, grads))
                has_sparse.append(not dense)
        grad_norm = None
        if group_args.clipping:
            if not self._supports_sparse:
                # (the class's refusal of a sparse gradient, as its reference
                # raises it, before the norm's)
                for (bucket, grads), sparse in zip(calls, has_sparse):
                    if sparse:
                        self._check_call(bucket, grads)
            grad_norm = self._clip_norm(
                [g for _, grads in calls for g in grads]
                + [p.grad for _, group in torch_groups for p in group["params"]
                   if p.grad is not None],
                grad_scale,
            )
        scalars = _bucket.StepScalars(grad_scale, found_inf, grad_norm)

        def extras(bucket: Bucket) -> OpExtras:
            return bucket.op_extras(scalars)

        prepared = None  # [(dense call or None, sparse parts)], all validated
        if len(calls) > 1 or torch_groups or any(has_sparse):
            # Note [validate before mutating]: every call is checked (the
            # op's own checks, Note [validate only]) before any writes.
            prepared = [self._prepare(bucket, grads, group_args, extras, sparse)
                        for (bucket, grads), sparse in zip(calls, has_sparse)]
        if torch_groups:
            self._torch_step([group for _, group in torch_groups], grad_norm, progress, journal)
        sparse = []
        try:
            if prepared is None and calls:
                # One call: the op checks everything before it writes, so
                # it is its own validation (no second pass over the lists).
                bucket, grads = calls[0]
                try:
                    self._launch(bucket, grads, group_args, extras(bucket))
                    progress["written"] = True
                except RuntimeError:
                    # Nothing was written: the checks name the culprit.
                    prepared = [self._prepare(bucket, grads, group_args, extras, False)]
            for dense, sparse_here in prepared or ():
                progress["written"] = True
                if dense is not None:
                    self._launch(*dense, group_args, extras(dense[0]))
                sparse += sparse_here
        finally:
            _bucket.clear_new_state(plan.buckets)
        progress["written"] = True
        for group, params, grads, is_new in sparse:
            for param in params:
                if param in self.state:  # (a torch bug: Note [state arena])
                    _arena.unpack(self.state[param])
            self._sparse_step(group, params, grads, is_new)
        if grad_norm is not None:
            self._grad_norm_cell[0] = grad_norm

    def _torch_step(self, groups: list, grad_norm, progress: dict, journal: Journal) -> None:
        """torch.optim's code for ``groups``, run before the fused calls
        (validated by then): torch's code checks some things only as it
        runs (capturable=True on the CPU, a state tensor of the wrong
        shape), and run after them it raised with the fused groups
        written. ``journal`` watches the state of params that have none,
        so a step it refuses leaves none made."""
        progress["written"] = True  # (no second try after it: Note [stale plans])
        for group in groups:
            differentiable = group.get("differentiable")
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state.get(param)
                if not state:
                    journal.watch(param)
                elif differentiable:  # (its updates record history: Note [state arena])
                    _arena.unpack(state, journal.set)
        _torch_path.torch_step(self, groups, grad_norm)

    def _clip_norm(self, grads: list, grad_scale) -> torch.Tensor:
        """The global norm of this step's gradients (unscaled), for
        clipping (``grad_norm`` keeps it once the step has succeeded).
        Writes nothing."""
        try:
            norm = _clip.global_norm(grads, grad_scale)
        except RuntimeError:
            if any(g.is_sparse for g in grads):
                raise RuntimeError(
                    f"fused_optim.{type(self).__name__}: max_grad_norm does not support "
                    "sparse gradients"
                ) from None
            raise
        return norm

    def _apply_kept_calls(self, plan: Plan, progress: dict) -> bool:
        """The common step, at the least Python cost: every gradient
        present, no group on torch's path (_kept_calls.py: the
        calls' arguments are kept between steps). Returns False, having
        written nothing, when the step needs the general path (which also
        finds why a refused call was refused)."""
        if not plan.buckets or plan.torch_groups:
            return False
        if plan.kept_calls is None:
            plan.kept_calls = KeptCalls(self._op_name, plan.buckets)
        return plan.kept_calls.run(self, plan.options, progress)

    def _prepare(self, bucket: Bucket, grads: list, group_args, extras, has_sparse: bool) -> tuple:
        """Checks one call without writing anything: returns (the dense call
        or None, [(group, params, grads, is_new)] of its sparse gradients),
        or raises, naming the group and param where it can. ``has_sparse``:
        whether a gradient is sparse (the op takes dense ones only)."""
        if not (has_sparse and self._supports_sparse):
            try:
                self._launch(bucket, grads, group_args, extras(bucket), validate=True)
                return (bucket, grads), []
            except RuntimeError:
                self._check_call(bucket, grads)  # a friendlier message
                raise
        dense, sparse = self._split_sparse(bucket, grads)
        if dense is not None:
            try:
                self._launch(*dense, group_args, extras(dense[0]), validate=True)
            except RuntimeError:
                self._check_call(*dense)
                raise
        return dense, sparse

    def _check_torch_group(self, gi: int, group) -> None:
        """Validates a group that torch.optim's step will update, before
        anything is written (torch's own checks run again inside)."""
        check_torch_path_precision(type(self).__name__, group, self._takes_caution)
        check_group_lr(type(self).__name__, gi, group["lr"])
        if self._lists_a_param_twice(group):
            self._check_param_listed_twice(gi, group)
        if (group.get("fused") and group.get("differentiable") and self._fused_differentiable_error
                and any(p.grad is not None for p in group["params"])):
            raise RuntimeError(self._fused_differentiable_error)
        for pi, param in enumerate(group["params"]):
            if param.grad is not None:
                self._check_grad(gi, pi, param, param.grad)
                # (what torch's code refuses after writing: Adagrad's step
                # counter, SGD's params and momentum buffer)
                # (sparse state only follows a sparse gradient, which only
                # the classes that take them take: no per-param read else)
                if param.grad.is_sparse:
                    self._check_sparse(group, param, param.grad, False)
                elif self._supports_sparse:
                    self._check_no_sparse_state(gi, pi, self.state.get(param, {}).values())

    def _check_param_listed_twice(self, gi: int, group) -> None:
        """Note [a param listed twice] (_base.py): torch.optim's code steps
        the group, so it cannot have what only the fused step has."""
        ours = chosen_fused_only_options(group)
        if ours:
            raise ValueError(
                f"fused_optim.{type(self).__name__}: param group {gi} lists a param more than "
                f"once, which only torch.optim's implementation steps (once per listing, one "
                f"after the other), and {', '.join(ours)} need(s) the fused step: list each "
                "param once"
            )

    def _learning_rates(self, groups=None) -> tuple[list, bool]:
        """(each group's lr, whether they are tensors), of ``groups`` (by
        default the param groups). The lrs go as tensors when every group's
        lr is a tensor on an accelerator: the kernel reads them there, so
        the step needs no host sync and a captured CUDA graph sees the
        scheduler's updates. Otherwise as floats."""
        lrs = [g["lr"] for g in (self.param_groups if groups is None else groups)]
        if set(map(type, lrs)) == {float}:  # (the usual case, read every step)
            return lrs, False
        for gi, lr in enumerate(lrs):
            check_group_lr(type(self).__name__, gi, lr)
        on_device = [isinstance(lr, torch.Tensor) and lr.device.type != "cpu" for lr in lrs]
        if all(on_device):
            return lrs, True
        if any(on_device):
            raise ValueError(
                f"fused_optim.{type(self).__name__}: some param groups have their lr as a "
                "tensor on an accelerator and others not; give every group's lr as a tensor "
                "on the params' device (read by the kernel, capturable) or none"
            )
        return list(map(to_float, lrs)), False

    def _group_arguments(self, torch_groups=()) -> GroupArguments:
        """The per-group arguments of this step's op calls, read once.
        The groups of indices ``torch_groups`` are stepped by torch.optim's
        code, not by the op: their options are not read as the op's (they
        may be tensors that require grad, differentiable=True); a stepped
        group's stand in for them, which no call refers to. Clipping reads
        every group."""
        groups = self.param_groups
        signature = _ops.SIGNATURES[self._op_name]
        read = groups
        if torch_groups:
            stand_in = next((g for i, g in enumerate(groups) if i not in torch_groups), None)
            # (every group on torch's path: no call, nothing to read)
            read = [] if stand_in is None else [
                stand_in if i in torch_groups else g for i, g in enumerate(groups)]
        if read:
            (lr, tensor_lr), hyper = self._learning_rates(read), self._hyperparameter_lists(read)
        else:
            lr, tensor_lr, hyper = [], False, [[] for _ in signature.hyperparameters]
        return GroupArguments(
            lr,
            tensor_lr,
            dict(zip(signature.hyperparameters, hyper)),
            {name: [bool(g.get(self._group_flag_keys.get(name, name), False)) for g in read]
             for name in signature.group_flags},
            _clip.group_max_grad_norms(groups),
            any(g.get("max_grad_norm") is not None for g in groups),
        )

    def _op_call(self, bucket: Bucket, grads: list, group_args: GroupArguments,
                 extras: OpExtras) -> OpCall:
        """One bucket's op call: complex tensors as real views, like
        torch.optim's view_as_real."""
        params, grads, states = _bucket.call_tensors(bucket, grads)
        return self._op_call_of(bucket.mode, bucket.state_names, params, grads, states,
                                bucket.steps(), bucket.group_index, bucket.new_state,
                                group_args, extras, bucket.scalar_state_lists())

    def _op_call_of(self, mode, state_names, params, grads, states, steps, group_index,
                    new_state, group_args: GroupArguments, extras: OpExtras,
                    scalar_states=()) -> OpCall:
        """The op call of aligned lists (``states``: one list per name of
        ``state_names``); the op's schema names every argument
        (_ops.OpSignature); ``scalar_states``: one list per name of
        ``_scalar_state_names``."""
        args = _ops.SIGNATURES[self._op_name].arguments(
            params=params,
            grads=grads,
            states=dict(zip(map(_ops.state_list_name, state_names), states)),
            master_params=extras.master_params,
            steps=steps,
            group_index=group_index,
            lr=group_args.lr,
            hyper=group_args.hyper,
            group_flags=group_args.flags,
            new_state=new_state,
            grad_scale=extras.grad_scale,
            found_inf=extras.found_inf,
            max_grad_norm=group_args.max_grad_norm,
            grad_norm=extras.grad_norm,
            modes=self._op_modes(mode),
            stochastic_rounding=extras.stochastic_rounding,
            rounding_ids=extras.rounding_ids,
            scalar_states=dict(zip(map(_ops.state_list_name, self._scalar_state_names), scalar_states)),
        )
        return OpCall(self._op_name, group_args.tensor_lr, args)

    def _launch(self, bucket: Bucket, grads: list, group_args: GroupArguments, extras: OpExtras,
                validate: bool = False) -> None:
        """Calls the op on one bucket, through fused_optim._C (the same
        kernel as torch.ops.fused_optim.<op>, with a cheaper crossing for
        thousands of tensors: Note [fast op call] in
        csrc/python_module.cpp), or for DTensor params through
        _dtensor.direct_entry (the same call, without DTensor's dispatch of
        it); with ``validate``, only its checks."""
        call = self._op_call(bucket, grads, group_args, extras)
        _dtensor.eager_entry(call, validate)(*call.args)

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
                self._check_sparse(group, bucket.params[i], g, i in new_state)
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
                self._check_sparse(self.param_groups[gi], param, grad, i in bucket.new_state)
            else:
                self._check_no_sparse_state(gi, pi, [bucket.state_dicts[i][name]
                                                     for name in bucket.state_names])

    def _check_no_sparse_state(self, gi: int, pi: int, state_tensors) -> None:
        """A dense gradient cannot be added to sparse state: torch.optim's
        SGD keeps the momentum of a first sparse gradient sparse, and raises
        for a later dense one (add(sparse, dense) is not supported)."""
        if any(isinstance(t, torch.Tensor) and t.is_sparse for t in state_tensors):
            raise RuntimeError(
                f"fused_optim.{type(self).__name__}: param {pi} of param group {gi} has a "
                "dense gradient but sparse state (made by a sparse gradient); torch.optim "
                "raises here too: add(sparse, dense) is not supported")

    def _check_grad(self, gi: int, pi: int, param, grad) -> None:
        """Raises if ``grad`` cannot update ``param`` (param ``pi`` of group
        ``gi``): sparse where unsupported, or a layout, dtype, shape or
        device that differs from the param's."""
        name = type(self).__name__
        where = f"param {pi} of param group {gi}"
        if grad.is_sparse and not self._supports_sparse:
            # (torch's message first, as code that matches it expects)
            message = self._sparse_gradient_error or f"{name} does not support sparse gradients"
            raise RuntimeError(f"{message} (fused_optim.{name}: {where})")
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
