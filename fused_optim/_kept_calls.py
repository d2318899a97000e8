"""The step's op calls, kept from one step to the next.

Most steps are the same calls every time: every param in the same buckets
(one per device, dtype, mode and precision; usually one), every gradient
present, no group on torch's path (with or without GradScaler: its scalars
are this step's arguments like the gradients). Such a step is made by
the plan's kept calls (``KeptCalls``). One call is its own validation: the
op checks all of its inputs before it writes any. Several calls are each
validated (the op's ``validate_`` twin) before the first is made (Note
[validate before mutating] in _step.py).

Note [repeated call]
A training loop steps with the same groups, params and options every time.
Building a call from them (the per-group lists, then every argument by
name: _step.StepProtocol._op_call) costs about as much as the update of a
small model. So each call's argument list is kept, with the group options it
was built from, and a step re-reads only what can change without a new
plan: the gradients, the state tensors from the state dicts (a state tensor
the user replaced is the one updated, as in torch.optim), the step
counters, the master copies, GradScaler's scalars, when clipping the norm,
and every group's lr (an lr scheduler sets a new one every step;
``_learning_rates``, as the general path reads it). The other group-derived arguments (the
hyperparameters, the flags, max_grad_norm) are rebuilt when any group
option other than lr is not the very object they were built from: every
option, not only those the op reads, so nothing an optimizer derives its
arguments from can be missed. The plan check compares the options (Note
[group options] in _group_options.py) and takes a new snapshot when any
changed: calls built under another snapshot are rebuilt. Options that could
change without being replaced (a tensor, changed in place; anything but a
number, string, dtype, None, or a tuple or list of these) make them read
afresh every step. What the plan caches (the params, their state dicts,
the buckets) the plan checks (_planning.py).
"""

from __future__ import annotations

from operator import itemgetter

from fused_optim import _C, _bucket, _clip, _dtensor, _ops
from fused_optim._build import require_device_supported
from fused_optim._bucket import Bucket
from fused_optim._dtensor import is_dtensor


class KeptCalls:
    """A plan's op calls, one per bucket, with their arguments kept between
    steps (Note [repeated call])."""

    def __init__(self, op_name: str, buckets: list) -> None:
        self.buckets = buckets
        self.calls = [OneCall(op_name, bucket) for bucket in buckets]
        self._options = None  # the plan's GroupOptions the group arguments were read under
        self._group_args = None
        self._tensor_lr = None
        # The clipping norm's gradients, read in C++ by one sum_of_squares
        # call (_clip.norm_of_gradients_of), where they can be: every param
        # real, not a DTensor, on one device; else None (read in Python).
        params = [p for bucket in buckets for p in bucket.params]
        plain = not any(bucket.is_complex for bucket in buckets) and not any(
            map(is_dtensor, params))
        self._norm_grads = _C.GradsOf(params) if plain and _C.on_one_device(params) else None

    def run(self, optimizer, options, progress: dict) -> bool:
        """Makes the calls (the whole step) and returns True, or returns
        False having written nothing: the step needs the general path (a
        gradient missing or sparse, or a call refused; the general path
        finds why).
        ``options``: the plan's snapshot of the group options, new when any
        changed (Note [group options]). Sets ``progress["written"]`` once a
        call has written."""
        lr, tensor_lr = optimizer._learning_rates()  # (every step: schedulers)
        rebuild = options is not self._options or not options.kept or tensor_lr != self._tensor_lr
        group_args = optimizer._group_arguments() if rebuild else self._group_args
        norm_in_cpp = group_args.clipping and self._norm_grads is not None
        grads_of = []
        for call in self.calls:
            grads = call.gradients(group_args.clipping and not norm_in_cpp, rebuild)
            if grads is None:  # (missing or sparse gradients: the general path's)
                return False
            grads_of.append(grads)
        # GradScaler's scalars, set on the optimizer for this step (AMP)
        grad_scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        grad_norm = None
        if norm_in_cpp:  # (one norm over every call's gradients)
            grad_norm = _clip.norm_of_gradients_of(
                self._norm_grads, self.buckets[0].device, grad_scale)
            if grad_norm is None:  # (a gradient missing or sparse, seen by the read)
                return False
        elif group_args.clipping:
            grad_norm = optimizer._clip_norm([g for grads in grads_of for g in grads], grad_scale)
        if rebuild:
            self._group_args = group_args
            self._options, self._tensor_lr = options, tensor_lr
        scalars = _bucket.StepScalars(grad_scale, found_inf, grad_norm)
        try:
            for call, grads in zip(self.calls, grads_of):
                call.prepare(optimizer, grads, group_args, lr, scalars, rebuild)
            if len(self.calls) > 1 and not all([call.validate() for call in self.calls]):
                self._options = None  # (as after a refused call: built afresh next time)
                return False  # (a gradient missing or sparse, seen by the op's read)
            for call in self.calls:
                if not call.make():
                    if progress["written"]:  # (validated: a gradient changed meanwhile)
                        raise RuntimeError("fused_optim: a gradient was removed or made sparse "
                                           "by another thread during the step")
                    self._options = None
                    return False  # (a gradient missing or sparse: nothing was written)
                progress["written"] = True
        except RuntimeError:
            self._options = None  # (built afresh next time)
            if progress["written"]:  # (a validated call raised: not expected)
                raise
            return False  # nothing was written
        finally:
            for call in self.calls:
                call.release_step_tensors()
        _bucket.clear_new_state(self.buckets)
        if grad_norm is not None:
            optimizer._grad_norm_cell[0] = grad_norm
        return True


class OneCall:
    """One bucket's op call, its arguments a list kept between steps."""

    def __init__(self, op_name: str, bucket: Bucket) -> None:
        self.bucket = bucket
        index = _ops.SIGNATURES[op_name].index
        self._grads = index["grads"]
        self._params = index["params"]
        # (this step's scalars: Bucket.op_extras)
        self._scalars = (index["grad_scale"], index["found_inf"], index["grad_norm"])
        self._lr = index["lr"]
        # (the slot of each list read from the state dicts, and its reader)
        self._reads = [(index[name], itemgetter(key)) for name, key in bucket.per_param_lists()]
        self._states = [index[_ops.state_list_name(n)] for n in bucket.state_names]
        self._grads_of = _C.GradsOf(bucket.params)
        self._complex = bucket.is_complex
        # DTensor params (FSDP2, TP): the call is made by _dtensor's direct
        # entry (_dtensor.eager_entry), which takes the gradients as a list
        self._on_dtensors = any(map(is_dtensor, bucket.params))
        self._call = None  # the last call (its arguments a list, refreshed in place)
        self._function = None  # its entry: fused_optim._C's, or _dtensor's direct one
        self._validate = None  # the entry's validate_ twin

    def gradients(self, clipping: bool, rebuild: bool):
        """This step's gradients, or None when one is missing or sparse (as
        far as read here). A list when Python reads them (``clipping``:
        a clipping norm taken in Python; complex views; DTensors, for
        _dtensor's direct entry), else ``_C.GradsOf``: the op reads them
        itself, making no Python object for a gradient autograd made, and
        its call says whether they were all there (Note [gradients read in
        C++] in csrc/python_module.cpp); they are checked here first only
        when the call is to be built (``rebuild``, or no call kept)."""
        if clipping or self._complex or self._on_dtensors:
            grads, complete, dense = _bucket.gather_grads(self.bucket.params)
            return grads if complete and dense else None
        if (rebuild or self._call is None) and not all(_C.grads_presence(self.bucket.params)):
            return None
        return self._grads_of

    def prepare(self, optimizer, grads: list, group_args, lr: list,
                scalars: _bucket.StepScalars, rebuild: bool) -> None:
        """This step's arguments: the call built afresh (``rebuild``: from
        new group arguments; or after a refused call), else refreshed."""
        bucket = self.bucket
        if rebuild or self._call is None:
            self._call = None
            require_device_supported(bucket.device, bucket.dtype, type(optimizer).__name__)
            call = optimizer._op_call(bucket, grads, group_args, bucket.op_extras(scalars))
            self._call = call._replace(args=list(call.args))
            self._function = _dtensor.eager_entry(call)
            self._validate = _dtensor.eager_entry(call, validate=True)
        else:
            self._refresh(grads, scalars)
            self._call.args[self._lr] = lr

    def validate(self) -> bool:
        """Raises what ``make`` would raise, writing nothing; False where
        ``make`` would return False."""
        try:
            complete = self._validate(*self._call.args)
        except RuntimeError:
            self._call = None
            raise
        if not complete:
            self._call = None  # (checked before it is built again)
        return complete

    def make(self) -> bool:
        """Makes the call (the op checks it before writing anything) and
        returns True; or returns False, having written nothing, when a
        gradient is missing or sparse (Note [gradients read in C++])."""
        try:
            made = self._function(*self._call.args)
        except RuntimeError:
            self._call = None
            raise
        if not made:
            self._call = None  # (checked before it is built again)
        return made

    def release_step_tensors(self) -> None:
        """Drops this step's tensors from the kept arguments: a kept
        gradient would outlive ``zero_grad(set_to_none=True)`` (a model's
        worth of memory until the next step), a replaced state tensor its
        replacement."""
        if self._call is None:
            return
        args = self._call.args
        args[self._params] = args[self._grads] = []
        for slot, _ in self._reads:
            args[slot] = []
        for slot in self._scalars:
            args[slot] = None

    def _refresh(self, grads: list, scalars: _bucket.StepScalars) -> None:
        """Puts this step's tensors into the kept arguments."""
        bucket, args = self.bucket, self._call.args
        dicts = bucket.state_dicts
        for slot, read in self._reads:
            args[slot] = list(map(read, dicts))
        if bucket.is_complex:
            params, grads, states = _bucket.real_views(
                bucket.params, grads, [args[slot] for slot in self._states])
            for slot, tensors in zip(self._states, states):
                args[slot] = tensors
        else:
            params = bucket.params
        args[self._params] = params
        args[self._grads] = grads
        for slot, value in zip(self._scalars, scalars.on(bucket.device)):
            args[slot] = value
