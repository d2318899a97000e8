"""The optimizer step under torch.compile: Note [traced step]."""

from __future__ import annotations

import torch

from fused_optim import _arena, _bucket, _clip, _ops, _torch_path
from fused_optim._journal import Journal
from fused_optim._keywords import check_group_lr, chosen_precision_options
from fused_optim._ops import GroupArguments, OpExtras
from fused_optim._precision import dense_state, precision_of, real_dtype

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
    # So a traced step takes torch.optim's shape: an eager ``_init_group``
    # (Dynamo runs a method of that name outside the graph, as for
    # torch.optim, and guards on the state it made), one for all groups,
    # fills lists of the tensors that have gradients, and the public op
    # torch.ops.fused_optim.<op> updates them, one call per (device, dtype)
    # of each group. Same kernel and same math as eager, so the same bits
    # (stochastic rounding's too: a param's random stream is named by its
    # group and position, not by its call, _ops.rounding_ids_of).
    # Dynamo marks every group ``capturable=True`` in its traced copy of
    # the param groups; the traced code therefore never reads capturable
    # (_init_group sees the real groups). A tensor ``lr`` is read by the
    # kernel (the op's ``tensor_lr`` overload), so a scheduler changing it recompiles
    # nothing, as torch's compiled-optimizer recipe expects.

    def _init_group(self, indices, params, grads, states, masters, steps):
        """The eager half of a traced step, for the groups of ``indices``
        (all that the op steps, in order): validates them all, then creates
        missing state and appends to the (empty) lists the tensors of the
        params that have gradients, by group and then by (device, dtype);
        ``states`` gets each param's state tensors in ``_state_names``
        order, then its scalar state (``_scalar_state_names``), flat.
        Returns, per group, (its index, one tuple per op call): (start, end
        in ``params`` and ``grads``, start in ``states``, start in
        ``steps`` or -1 without counters, start in ``masters`` or -1
        without master weights, its rounding ids (_ops.rounding_ids_of)
        with stochastic rounding or None, indices of new state, complex).

        One call for every group, not one per group as torch.optim's: the
        state made here is stored by the traced code after the op (below),
        and Dynamo sees ``self.state`` as the first ``_init_group`` call
        leaves it (torch 2.13): a store after a second call dropped the
        state that call had made for other params (test_torch_compat:
        test_compiled_step_keeps_state_made_for_every_group)."""
        # Every group is checked before any state is made (torch's groups
        # were, _check_torch_groups), so a refused step makes none and
        # writes nothing.
        for gi in indices:
            self._check_traced_group(gi, self.param_groups[gi])
        return tuple((gi, self._init_one_group(gi, params, grads, states, masters, steps))
                     for gi in indices)

    def _init_one_group(self, gi, params, grads, states, masters, steps) -> tuple:
        """_init_group's work for group ``gi``: its calls' tuples."""
        group = self.param_groups[gi]
        mode = self._mode(group)
        dense_names = self._state_names(mode)
        names = dense_names + self._scalar_state_names
        kinds: dict = {}  # (device, dtype, precision) -> [(pi, param)]: one call each
        for pi, param in enumerate(group["params"]):
            if param.grad is not None:
                precision = precision_of(group, real_dtype(param),
                                         dense_state(self.state.get(param), dense_names))
                kinds.setdefault((param.device, param.dtype, precision), []).append((pi, param))
        keeps_step = self._keeps_step(group)
        calls = []
        for (_, _, precision), kind in kinds.items():
            start, state_start, new_state = len(params), len(states), []
            step_start, master_start = len(steps) if keeps_step else -1, len(masters)
            for _, param in kind:
                # (a None, torch 1.x's SGD placeholder, is made anew: not kept)
                before = {k for k, v in self.state.get(param, {}).items() if v is not None}
                state, is_new = self._ready_state(param, group, precision, Journal(self.state),
                                                  names=dense_names)
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
                if keeps_step:
                    # (a new counter, SGD's with stochastic rounding, is made)
                    steps.append(made["step"] if "step" in made else state["step"])
            if not precision.master_weights:
                master_start = -1
            rounding_ids = (_ops.rounding_ids_of((gi, pi) for pi, _ in kind)
                            if precision.stochastic_rounding else None)
            calls.append((start, len(params), state_start, step_start, master_start,
                          rounding_ids, tuple(new_state), kind[0][1].is_complex()))
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

    def _check_torch_groups(self) -> None:
        """Checks, before the traced step writes anything, the groups that
        torch.optim's code steps after it (_torch_step_eagerly). Eagerly,
        every step: what the checks read, such as a gradient turned
        sparse, is not guarded by Dynamo. Called before _traced_step, not
        in it: a graph break in _traced_step before its _init_group call
        fails Dynamo's restart of the frame (the state _init_group made
        the first time is there the second: torch 2.13)."""
        indices = [gi for gi, group in enumerate(self.param_groups)
                   if self._unfused(group, traced=True)]
        if indices:
            _check_torch_groups_eagerly(self, indices)

    def _traced_step(self) -> None:
        """The step as torch.compile traces it: Note [traced step]."""
        if not torch.compiler.is_compiling():  # Note [a step Dynamo runs eagerly]
            self._eager_step_without_dynamo()
            return
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # The groups torch.optim's code steps (Dynamo guards on the param
        # lists _unfused reads), checked before (_check_torch_groups).
        torch_groups = []
        for group in self.param_groups:
            _guard_on_precision_options(group)
            if self._unfused(group, traced=True):
                torch_groups.append(group)
        indices = tuple(gi for gi, group in enumerate(self.param_groups)
                        if not any(group is g for g in torch_groups))
        params, grads, states, masters, steps = [], [], [], [], []
        ours = self._init_group(indices, params, grads, states, masters, steps) if indices else ()
        grad_norm = None
        if any(group.get("max_grad_norm") is not None for group in self.param_groups):
            # The norm spans every group: all gradients, before any update.
            every_grad = grads + [
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
        for gi, calls in ours:
            group = self.param_groups[gi]
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
            for (start, end, state_start, step_start, master_start, rounding_ids, new_state,
                 is_complex) in calls:
                n = end - start
                call_params, call_grads = params[start:end], grads[start:end]
                state_end = state_start + n * count
                per_param = [states[state_start + k:state_end:count] for k in range(count)]
                call_steps = [] if step_start < 0 else steps[step_start:step_start + n]
                call_states, scalar_states = per_param[:len(names)], per_param[len(names):]
                if is_complex:
                    call_params, call_grads = _bucket.as_real(call_params), _bucket.as_real(call_grads)
                    call_states = [_bucket.as_real(s) for s in call_states]
                device = call_params[0].device
                extras = OpExtras(
                    [] if master_start < 0 else masters[master_start:master_start + n],
                    None if grad_scale is None else grad_scale.to(device),
                    None if found_inf is None else found_inf.to(device),
                    rounding_ids is not None,
                    None if grad_norm is None else grad_norm.to(device),
                    rounding_ids,
                )
                call = self._op_call_of(
                    mode, names, call_params, call_grads, call_states,
                    call_steps, [0] * n, list(new_state), group_args, extras, scalar_states,
                )
                # (the state made for the call's new params: stored after it)
                made = [(params[start + i], names,
                         states[state_start + i * count:state_start + i * count + len(names)],
                         call_steps[i] if call_steps else None) for i in new_state]
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

    # Note [a step Dynamo runs eagerly]
    # Dynamo runs a frame eagerly that it will not trace: one past its
    # recompile limit (each set of params with gradients is a recompile),
    # one whose trace broke in a loop, and, for every later call of its
    # code, one whose trace held no op (torch 2.13: "No ops traced", a
    # step where no param has a gradient, as a warm-up ``step()`` before
    # the first backward). In the last two it still compiles, one by one,
    # the functions the frame calls, and such frames of this step's
    # helpers were wrong: one traced for a param that looks its state up
    # was replayed for another param, its guards not holding the param's
    # identity, and gave Adam one param's moments for the next (refused
    # where the shapes differ, used where not: test_torch_compat.
    # test_compiled_step_after_a_step_without_gradients).
    # So the traced step asks ``torch.compiler.is_compiling()``, which
    # does two things. Traced, the call keeps Dynamo from skipping the
    # frame for holding no op (it cannot know that eager would do the
    # same: pytorch#110765), so a step without gradients ends nothing and
    # the next step is traced. Run eagerly, the step is the eager one
    # with Dynamo disabled inside: the same kernels and results.
    # (torch.optim's own steps are skipped after a step without gradients,
    # and run from then on with their functional code compiled frame by
    # frame.)
    @torch._disable_dynamo
    def _eager_step_without_dynamo(self) -> None:
        self._eager_step()

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
