"""The optimizer step under torch.compile: Note [traced step]."""

from __future__ import annotations

import torch

from fused_optim import _arena, _bucket, _clip, _ops, _torch_path
from fused_optim._journal import Journal
from fused_optim._keywords import check_group_lr, chosen_precision_options
from fused_optim._ops import GroupArguments, OpExtras
from fused_optim._precision import precision_of, real_dtype

@torch._disable_dynamo
def _check_torch_groups_eagerly(optimizer, indices: list) -> None:
    """The checks an eager step makes (``_check_torch_group``) of the
    groups of ``indices``, those torch.optim's code steps, made eagerly at
    the start of every compiled step that has such groups
    (TracedStep._check_torch_groups, which found them as it was traced)."""
    for gi in indices:
        optimizer._check_torch_group(gi, optimizer.param_groups[gi])


@torch._disable_dynamo
def _torch_step_eagerly(optimizer, groups: list, grad_norm) -> None:
    """torch.optim's code for ``groups``, run eagerly inside a compiled
    step (a graph break: see _traced_step), checked before anything was
    written (_check_torch_groups)."""
    _torch_path.torch_step(optimizer, groups, grad_norm)


def _guard_on_precision_options(group) -> None:
    """Reads ``group``'s precision options in traced code, so that Dynamo
    guards on them: a later change of one then retraces, and _init_group
    applies it (or the checks refuse it) as the eager step's next call
    would. Read only by _init_group, which Dynamo runs without tracing, a
    change went unseen: the graph kept the options it was traced with."""
    chosen_precision_options(group)


@torch._disable_dynamo
def _call_public_eagerly(optimizer, calls: list, made: list) -> None:
    """Makes ``calls``; if one raises, takes ``made`` (stored just before,
    see _traced_step) back out of the state: a failed step makes none."""
    try:
        for call in calls:
            _ops.call_public(call)
    except BaseException:
        optimizer._take_back_made_state(made)
        raise


class TracedStep:
    """The traced step of FusedOptimizer (a mixin: it uses the optimizer's
    planning helpers and its ``_op_call_of``)."""

    # Note [traced step]
    # Under torch.compile the step is traced into the graph, which the plan
    # (Python objects cached across steps) and the pybind call would break.
    # So a traced step takes torch.optim's shape: per param group, an eager
    # ``_init_group`` (Dynamo runs a method of that name outside the graph,
    # as for torch.optim, and guards on the state it made) fills lists of
    # the tensors that have gradients, and the public op
    # torch.ops.fused_optim.<op> updates them, one call per (device, dtype)
    # of the group. Same kernel and same math as eager, so the same bits
    # (but for stochastic rounding's streams where eager's call holds
    # several groups: docs/design.md).
    # Dynamo marks every group ``capturable=True`` in its traced copy of
    # the param groups; the traced code therefore never reads capturable
    # (_init_group sees the real groups). A tensor ``lr`` is read by the
    # kernel (the op's ``tensor_lr`` overload), so a scheduler changing it recompiles
    # nothing, as torch's compiled-optimizer recipe expects.

    def _init_group(self, group, params, grads, states, masters, steps):
        """The eager half of a traced step for one group: validates, creates
        missing state, and appends to the (empty) lists the tensors of the
        params that have gradients, grouped by (device, dtype); ``states``
        gets each param's state tensors in ``_state_names`` order, then its
        scalar state (``_scalar_state_names``), flat.
        Returns one tuple per op call: (start, end, start in ``masters`` or
        -1 without master weights, stochastic rounding, indices of new
        state, complex)."""
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        if all(self._stepped_by_torch_when_traced(g) for g in self.param_groups[:gi]):
            # The step's first call: every traced group is checked before
            # any state is made (torch's groups were, _check_torch_groups),
            # so a refused step makes none and writes nothing.
            for gj, other in enumerate(self.param_groups):
                if not self._stepped_by_torch_when_traced(other):
                    self._check_traced_group(gj, other)
        mode = self._mode(group)
        names = self._state_names(mode) + self._scalar_state_names
        kinds: dict = {}
        for param in group["params"]:
            if param.grad is not None:
                kinds.setdefault((param.device, param.dtype), []).append(param)
        calls = []
        for kind_params in kinds.values():
            start, master_start, new_state = len(params), len(masters), []
            for param in kind_params:
                precision = precision_of(group, real_dtype(param))
                before = set(self.state.get(param, ()))
                state, is_new = self._ready_state(param, group, precision, Journal(self.state))
                _arena.unpack(state)  # (aliased graph inputs: Note [state arena])
                made = {}
                if is_new:
                    new_state.append(len(params) - start)
                    # Kept out of the state until the traced code stores it
                    # after the op: Dynamo guards on the state as this
                    # method leaves it, so the next step then recompiles
                    # without this call's "new" flags (as torch's SGD).
                    made = {k: state.pop(k) for k in set(state) - before if k != "master_param"}
                params.append(param)
                grads.append(param.grad)
                states.extend(made[name] if name in made else state[name] for name in names)
                if precision.master_weights:
                    masters.append(state["master_param"])
                if self._keeps_step(group):
                    steps.append(state["step"])
            if not precision.master_weights:
                master_start = -1
            calls.append((start, len(params), master_start, precision.stochastic_rounding,
                          tuple(new_state), kind_params[0].is_complex()))
        return tuple(calls)

    def _check_traced_group(self, gi: int, group) -> None:
        """Raises if a param of ``group`` (group ``gi``) with a gradient
        cannot take a traced step, or its lr cannot be read."""
        check_group_lr(type(self).__name__, gi, group["lr"])
        for pi, param in enumerate(group["params"]):
            if param.grad is not None:
                self._check_param(param, group, gi, pi)
                if param.grad.is_sparse:
                    raise RuntimeError(
                        f"fused_optim.{type(self).__name__}: sparse gradients are not supported "
                        "under torch.compile"
                    )
                self._check_grad(gi, pi, param, param.grad)

    def _stepped_by_torch_when_traced(self, group) -> bool:
        """Whether torch.optim's code steps ``group`` in a traced step (the
        traced step makes no plan, whose groups _unfused reads)."""
        return (self._lists_a_param_twice(group)
                or _torch_path.uses_torch_path(group, self._takes_caution))

    def _check_torch_groups(self) -> None:
        """Checks, before the traced step writes anything, the groups that
        torch.optim's code steps after it (_torch_step_eagerly). Eagerly,
        every step: what the checks read, such as a gradient turned
        sparse, is not guarded by Dynamo. Called before _traced_step, not
        in it: a graph break in _traced_step before its _init_group calls
        fails Dynamo's restart of the frame (the state _init_group made
        the first time is there the second: torch 2.13)."""
        indices = [gi for gi, group in enumerate(self.param_groups)
                   if self._stepped_by_torch_when_traced(group)]
        if indices:
            _check_torch_groups_eagerly(self, indices)

    def _traced_step(self) -> None:
        """The step as torch.compile traces it: Note [traced step]."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # The groups torch.optim's code steps (_unfused, found here: the
        # traced step makes no plan; Dynamo guards on the param lists),
        # checked before (_check_torch_groups).
        torch_groups = []
        for group in self.param_groups:
            _guard_on_precision_options(group)
            if self._stepped_by_torch_when_traced(group):
                torch_groups.append(group)
        ours = []
        for group in self.param_groups:
            if any(group is g for g in torch_groups):
                continue
            params, grads, states, masters, steps = [], [], [], [], []
            calls = self._init_group(group, params, grads, states, masters, steps)
            ours.append((group, params, grads, states, masters, steps, calls))
        grad_norm = None
        if any(group.get("max_grad_norm") is not None for group in self.param_groups):
            # The norm spans every group: all gradients, before any update.
            every_grad = [g for _, _, grads, *_ in ours for g in grads] + [
                p.grad for group in torch_groups for p in group["params"] if p.grad is not None
            ]
            grad_norm = _clip.traced_global_norm(every_grad, grad_scale)
        # Calls with complex params, made eagerly after the traced ones:
        # Functionalization cannot yet replay a custom op's writes through
        # view_as_real views. One graph break, at the end: with the break
        # between two groups' calls, the call traced after it updated the
        # params of the call before it (torch 2.13, on every backend; seen
        # in the frame Dynamo resumes after the break, not traced further:
        # test_torch_compat.test_compiled_step_with_complex_groups_between_others).
        eager_calls, stored_after = [], []
        for group, params, grads, states, masters, steps, calls in ours:
            mode = self._mode(group)
            names = self._state_names(mode)
            scalar_names = self._scalar_state_names
            count = len(names) + len(scalar_names)
            lr = group["lr"]
            tensor_lr = isinstance(lr, torch.Tensor)
            group_args = GroupArguments(
                [lr] if tensor_lr else [float(lr)],
                tensor_lr,
                {name: [value] for name, value in self._hyperparameters(group).items()},
                {name: [bool(group.get(self._group_flag_keys.get(name, name), False))]
                 for name in _ops.SIGNATURES[self._op_name].group_flags},
                _clip.group_max_grad_norms([group]),
                grad_norm is not None,
            )
            for start, end, master_start, rounding, new_state, is_complex in calls:
                call_params, call_grads = params[start:end], grads[start:end]
                per_param = [states[start * count + k:end * count:count] for k in range(count)]
                call_states, scalar_states = per_param[:len(names)], per_param[len(names):]
                if is_complex:
                    call_params, call_grads = _bucket.as_real(call_params), _bucket.as_real(call_grads)
                    call_states = [_bucket.as_real(s) for s in call_states]
                device = call_params[0].device
                extras = OpExtras(
                    [] if master_start < 0 else masters[master_start:master_start + end - start],
                    None if grad_scale is None else grad_scale.to(device),
                    None if found_inf is None else found_inf.to(device),
                    rounding,
                    None if grad_norm is None else grad_norm.to(device),
                )
                call = self._op_call_of(
                    mode, names, call_params, call_grads, call_states,
                    steps[start:end] if steps else [], [0] * (end - start),
                    list(new_state), group_args, extras, scalar_states,
                )
                # (the state made for the call's new params: stored after it)
                made = [(params[start + i], names,
                         states[(start + i) * count:(start + i) * count + len(names)],
                         steps[start + i] if steps else None) for i in new_state]
                if is_complex:
                    eager_calls.append(call)
                    stored_after += made
                else:
                    _ops.call_public(call)
                    self._store_made_state(made)
        if eager_calls:
            # The state made for them is stored before the break, in the
            # traced frame: there Dynamo sees the store and guards on it,
            # so the next step recompiles without this step's "new" flags.
            # Stored in the frame resumed after the break, it could go
            # unseen when no traced call stored state (a group of one
            # complex param): every later step replayed the first step's
            # graph, restarting SGD's momentum from each gradient
            # (test_torch_compat: test_compiled_step_with_only_complex_params...).
            self._store_made_state(stored_after)
            _call_public_eagerly(self, eager_calls, stored_after)
        if torch_groups:
            # torch's own code, run as eager torch runs it (traced, it
            # would take its capturable branch: other rounding). Last,
            # unlike the eager step, which runs it first: here state made
            # for a new param (kept out of the state until its call,
            # _init_group) that crossed this graph break before its call
            # reached the call as another param's (torch 2.13: SGD with
            # momentum, a fused=False group before a fused one;
            # test_torch_compat). So what torch's code refuses as it runs
            # comes after the traced calls wrote (docs/design.md).
            _torch_step_eagerly(self, torch_groups, grad_norm)
        if grad_norm is not None:
            # (an item of a list: Dynamo replays that side effect after the
            # graph, where it drops an attribute set on an Optimizer)
            self._grad_norm_cell[0] = grad_norm

    def _store_made_state(self, made: list) -> None:
        """Puts the state that _init_group made for a call's new params
        (kept out until the call: Note in _init_group) into the state, with
        the step counter where the param has none: ``made`` holds (param,
        state names, state tensors, step counter or None)."""
        for param, names, tensors, step in made:
            # (not self.state[param]: Dynamo cannot trace a defaultdict
            # subclass's __missing__, a graph break in the first step)
            state = self.state.get(param)
            if state is None:
                state = self.state[param] = {}
            for name, tensor in zip(names, tensors):
                state[name] = tensor
            if step is not None and "step" not in state:
                state["step"] = step


    def _take_back_made_state(self, made: list) -> None:
        """Undoes ``_store_made_state(made)``: the entries it stored leave
        the state (and a param's entry, if nothing else is left in it)."""
        for param, names, tensors, step in made:
            state = self.state.get(param)
            if state is None:
                continue
            for name, tensor in zip(names, tensors):
                if state.get(name) is tensor:
                    del state[name]
            if step is not None and state.get("step") is step:
                del state["step"]
            if not state:
                del self.state[param]
