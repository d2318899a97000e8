"""DTensor support for the public ops: ``torch.ops.fused_optim.*`` on the
DTensors of FSDP2 (``fully_shard``) and tensor parallelism.

An optimizer update is pointwise: element i of a param depends only on
element i of its gradient and state. So a call whose tensor i is sharded the
same way in every list (same mesh, same placements) is the same call on the
local shards, with no communication. That is the whole rule, registered as
DTensor's handler for our ops (the dispatcher consults it before sharding
propagation): check the placements, unwrap, call the op on the local
tensors. One fused call still covers all the shards of a bucket.

- Tensors aligned with ``params`` (gradients, state, master weights) must
  be DTensors exactly where the param is one, on its mesh with its
  placements; anything else raises before a tensor is written (a
  redistribution would update a copy).
- Per-call tensors (``state_steps``, ``lr`` as tensors, ``grad_scale``,
  ``found_inf``) may be plain tensors (torch.optim keeps FSDP2 step
  counters plain) or replicated DTensors.
- Partial placements are refused: a pending reduction is not a value to
  update.
- An op whose update reads per-tensor norms (``_ops.TENSOR_NORM_OPS``:
  the trust ratios of LARS and LAMB, Note [per-tensor norms]) is not
  pointwise: a shard's norm is not its param's. When such a call has a
  sharded param, the handler first calls the op's ``measure`` overload on
  the local shards (each tensor's sums of squares, nothing written), sums
  each tensor's entries over the mesh dimensions it is sharded on (one
  all-reduce per such dimension and mesh, all tensors of the call at once),
  and then calls the update with those sums as ``tensor_sums`` (Note
  [norms across shards] in csrc/op_front.h). Every rank of the mesh must
  make the call, as for any collective; replicated and plain tensors need
  no communication. The ``measure`` overloads themselves, called on
  DTensors, return the sums of the whole tensors.
- Note [rounding ids of shards]: stochastic rounding draws an element's
  bits from its tensor's rounding id and its index in the tensor
  (csrc/include/fused_optim/precision.h), and a shard's indices are
  local: with its param's id, element i of every shard would draw the
  same bits, and the rounding errors of a sharded weight would repeat
  shard after shard. So a sharded param's id gets its shard's index (over
  the mesh dimensions it is sharded on, in bits 48 and up, which the
  classes' ids, (group << 32) | position, leave free below 65,536
  groups): every shard draws its own bits (the first shard of a tensor
  sharded on dim 0, as FSDP2's, those of the same elements of the whole
  tensor), and replicas (Replicate dimensions, as HSDP's) the same bits,
  so they stay equal.
- ``sum_of_squares`` (clipping's reduction, which a traced step calls on
  DTensor gradients) returns the sums of the whole tensors too, as a plain
  tensor: the same global sum as the eager step's (_clip.py).

Importing torch.distributed.tensor costs about half a second, so the
handler is registered when that module is imported, by whoever imports it
(or at once, if it already was).
"""

from __future__ import annotations

from itertools import compress
from operator import attrgetter, is_, is_not

import torch

from torch.autograd.graph import increment_version

from fused_optim import _on_import, _ops
from fused_optim._ops import (
    MEASURE_OVERLOADS,
    OP_NAMES,
    TENSOR_NORM_OPS,
    fast_entry,
    public_op,
    validate_entry,
)

_MODULE = "torch.distributed.tensor"
# torch.distributed.tensor.DTensor, once that module is imported (register).
_DTensor = None
# Per-call tensor arguments: not aligned with the params.
_PER_CALL = ("state_steps", "lr", "grad_scale", "found_inf", "tensor_sums")


def _sharded_dims(t) -> tuple:
    """The mesh dimensions a DTensor is sharded on (none for a plain tensor)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return ()
    return tuple(d for d, placement in enumerate(t.placements) if placement.is_shard())


def add_across_shards(part: torch.Tensor, mesh, dims) -> torch.Tensor:
    """``part`` (a plain tensor of per-shard sums) summed over the ranks of
    each mesh dimension in ``dims``: a functional collective per dimension,
    which a traced step (torch.compile) keeps in its graph; an in-place
    ``dist.all_reduce`` traced there would leave the sums unreduced."""
    import torch.distributed._functional_collectives as funcol

    for dim in dims:
        part = funcol.all_reduce(part, "sum", (mesh, dim))
    return part


def _sum_over_shards(sums: torch.Tensor, params: list) -> torch.Tensor:
    """``sums`` (sums of squares of the local shards, k entries per tensor
    of ``params``: entry j * n + i is tensor i's j-th; the norm ops' [2n]
    sums hold param i at i and its gradient or update at n + i) made those
    of the whole tensors: each tensor's entries summed over the ranks of
    each mesh dimension it is sharded on. Tensors sharded alike share one
    all-reduce per dimension (add_across_shards)."""
    n = len(params)
    k = sums.numel() // n if n else 0
    layouts: dict = {}  # (mesh, sharded dims) -> tensor indices
    for i, p in enumerate(params):
        dims = _sharded_dims(p)
        if dims:
            layouts.setdefault((p.device_mesh, dims), []).append(i)
    for (mesh, dims), indices in layouts.items():
        whole = len(indices) == n
        if whole:
            part = sums
        else:
            index = torch.tensor([j * n + i for j in range(k) for i in indices],
                                 device=sums.device)
            part = sums.index_select(0, index)
        part = add_across_shards(part, mesh, dims)
        if whole:
            sums = part
        else:
            sums = sums.index_copy(0, index, part)
    return sums


def _argument_values(op, args, kwargs) -> list:
    """A call's argument values in schema order (a keyword left out: its
    default, as a dispatch mode leaves out a keyword given its default)."""
    return list(args) + [kwargs[a.name] if a.name in kwargs else a.default_value
                         for a in op._schema.arguments[len(args):]]


def _replicated_local(where: str, name: str, t):
    """A per-call tensor argument as a plain tensor: itself, or the local
    tensor of a replicated DTensor (anything else raises)."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Replicate

    if any(p != Replicate() for p in t.placements):
        raise RuntimeError(
            f"{where}: {name} is a DTensor with placements {t.placements}; "
            "per-call tensors must be plain tensors or replicated"
        )
    return t.to_local()


def _same_objects(these, those) -> bool:
    """Whether two lists (or None) hold the very same objects, in order."""
    return these is not None and len(these) == len(those) and all(map(is_, these, those))


def _kind(t) -> str:
    return "a DTensor" if is_dtensor(t) else "a plain tensor"


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (False while torch.distributed.tensor is
    not imported: then none exists). Cheap: the step asks it per tensor."""
    return _DTensor is not None and type(t) is not torch.Tensor and isinstance(t, _DTensor)


# (read from every tensor of a list at C speed: map)
_SPEC_OF = attrgetter("_spec")
_LOCAL_OF = attrgetter("_local_tensor")
_PLAIN_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


class _LocalTensors:
    """The lists aligned with a call's params, made local: each DTensor
    checked against its param and replaced by its local shard. The checks
    run for every tensor of every list, every step (an FSDP2 step over
    thousands of params pays them), so where every param is a DTensor they
    read each list at C speed (``map``), take a spec that is the param's
    own object as equal (FSDP2's gradients share their param's) and compare
    the others field by field, from what the specs hold (a DTensor's
    ``shape`` takes a dispatch, about 1 us), meshes by identity first
    (usually one object for all).

    ``accepted`` (the direct entry's, kept between its calls; None for
    none): the specs that passed the checks last time, by list name
    ("params": the params' own). A spec is immutable, so the same spec
    objects against the same param specs pass again unchecked: a step's
    state tensors are those of the last step."""

    def __init__(self, where: str, params: list, accepted: dict | None = None) -> None:
        self.where = where
        self.params = params
        self.every_dtensor = bool(params) and set(map(type, params)) == {_DTensor}
        # each param's spec, or None for a plain param
        if self.every_dtensor:
            self.specs = list(map(_SPEC_OF, params))
        else:
            self.specs = [p._spec if is_dtensor(p) else None for p in params]
        self.all_plain = True  # every local tensor a torch.Tensor or Parameter (so far)
        if accepted is not None and not _same_objects(accepted.get("params"), self.specs):
            accepted.clear()
        self.accepted = accepted
        if accepted:
            return  # (the same params: checked below before)
        # (the other lists' placements must equal their param's)
        for i, spec in enumerate(self.specs):
            if spec is not None:
                for placement in spec.placements:
                    if placement.is_partial():
                        raise RuntimeError(
                            f"{where}: params[{i}] has a Partial placement {spec.placements}; "
                            "reduce it (redistribute) before the optimizer step"
                        )
        if accepted is not None:
            accepted["params"] = self.specs

    def __call__(self, name: str, tensors: list) -> list:
        if len(tensors) not in (0, len(self.params)):
            # The op's own length check reports it; unwrapped, so that the
            # op is not dispatched to this handler again (without end).
            return [self._unchecked_local(t) for t in tensors]
        if self.every_dtensor:
            try:
                own_specs = list(map(_SPEC_OF, tensors))
            except AttributeError:  # (a plain tensor: the loop below reports it)
                own_specs = None
            if own_specs is not None:
                accepted = self.accepted
                if not (accepted and _same_objects(accepted.get(name), own_specs)) and not all(
                        map(is_, own_specs, self.specs)):
                    for i in compress(range(len(tensors)), map(is_not, own_specs, self.specs)):
                        self._check_spec(name, i, own_specs[i], self.specs[i])
                if accepted is not None:
                    accepted[name] = own_specs
                local = list(map(_LOCAL_OF, tensors))
                if self.all_plain and not set(map(type, local)) <= _PLAIN_TYPES:
                    self.all_plain = False  # (a trace's tensors, or another subclass)
                return local
        local = []
        for i, (t, spec) in enumerate(zip(tensors, self.specs)):
            if spec is None:
                if is_dtensor(t):
                    self._raise_kinds(name, i, t)
            else:
                if not is_dtensor(t):
                    self._raise_kinds(name, i, t)
                own = t._spec
                if own is not spec:
                    self._check_spec(name, i, own, spec)
                t = t._local_tensor
            if type(t) not in _PLAIN_TYPES:
                self.all_plain = False
            local.append(t)
        return local

    def _check_spec(self, name: str, i: int, own, spec) -> None:
        if (own.mesh is not spec.mesh and own.mesh != spec.mesh) or own.placements != spec.placements:
            raise RuntimeError(
                f"{self.where}: {name}[{i}] has mesh {own.mesh} and placements "
                f"{own.placements}, but params[{i}] has {spec.mesh} and "
                f"{spec.placements}; an update is pointwise and needs them equal"
            )
        if own.tensor_meta.shape != spec.tensor_meta.shape:
            raise RuntimeError(
                f"{self.where}: {name}[{i}] has shape {tuple(own.tensor_meta.shape)} but "
                f"params[{i}] has shape {tuple(spec.tensor_meta.shape)}"
            )

    def _unchecked_local(self, t):
        local = t._local_tensor if is_dtensor(t) else t
        if type(local) not in _PLAIN_TYPES:
            self.all_plain = False
        return local

    def _raise_kinds(self, name: str, i: int, t) -> None:
        raise RuntimeError(
            f"{self.where}: params[{i}] is {_kind(self.params[i])} but {name}[{i}] is "
            f"{_kind(t)}; the tensors of one param must all be DTensors or all plain"
        )


def _local_call(op, args, kwargs):
    """DTensor's handler of our update ops and their ``measure`` overloads
    (``register``): the call on the local tensors."""
    arguments = op._schema.arguments
    values = _argument_values(op, args, kwargs)
    local_values, aligned = _localized(op, values)
    if op._overloadname in MEASURE_OVERLOADS:
        # The sums of the whole tensors.
        return _sum_over_shards(
            op(*_positional(arguments, local_values), **_keywords(arguments, local_values)),
            aligned.params)
    _add_sums_across_shards(op, local_values, aligned.params)
    if _fast_entry_takes(aligned):
        # (Note [fast op call]; positional, in schema order: it skips the
        # dispatcher's per-tensor boxing of a public op call)
        fast_entry(_op_name(op), op._overloadname == "tensor_lr")(*local_values)
        return None
    return op(*_positional(arguments, local_values), **_keywords(arguments, local_values))


def _op_name(op) -> str:
    return op._schema.name.split("::")[-1]


def _localized(op, values: list, accepted: dict | None = None) -> tuple:
    """A call's argument values (schema order) with every DTensor checked
    and replaced by its local tensor, and the ``_LocalTensors`` of the
    lists aligned with its params (``accepted``: theirs)."""
    arguments = op._schema.arguments
    names = [a.name for a in arguments]
    # (and the op's per-tensor scalar state, plain 0-d tensors as the steps)
    per_call = _PER_CALL + tuple(names[names.index("state_steps") + 1:names.index("group_index")])
    where = f"{op._schema.name}"
    aligned = _LocalTensors(where, values[names.index("params")], accepted)
    local_values = []
    for argument, value in zip(arguments, values):
        if argument.name in per_call:
            if isinstance(value, list):
                # (plain tensors as they are: FSDP2's step counters)
                if not all(type(t) is torch.Tensor for t in value):
                    value = [_replicated_local(where, argument.name, t) if isinstance(t, torch.Tensor) else t
                             for t in value]
            else:
                value = _replicated_local(where, argument.name, value)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            value = aligned(argument.name, value)
        elif argument.name == "rounding_ids" and value is not None:
            value = _shard_rounding_ids(value, aligned)
        local_values.append(value)
    return local_values, aligned


def _shard_rounding_ids(rounding_ids: list, aligned: _LocalTensors) -> list:
    """Note [rounding ids of shards]: each sharded param's rounding id with
    its shard's index over the mesh dimensions it is sharded on in bits 48
    and up (the index 0 shard's id unchanged). Kept with ``aligned``'s
    accepted specs: the same params, the same ids."""
    cache = aligned.accepted
    if cache is not None and cache.get("rounding_ids", (None,))[0] == rounding_ids:
        return cache["rounding_ids"][1]
    shard_ids = [rounding_id ^ (_shard_index(spec) << 48) if spec is not None else rounding_id
                 for rounding_id, spec in zip(rounding_ids, aligned.specs)]
    if cache is not None:
        cache["rounding_ids"] = (list(rounding_ids), shard_ids)
    return shard_ids


def _shard_index(spec) -> int:
    """This rank's shard of a DTensor, numbered over the mesh dimensions it
    is sharded on (0 where it is sharded on none: a replica)."""
    coordinate = spec.mesh.get_coordinate()
    index = 0
    for dim, placement in enumerate(spec.placements):
        if placement.is_shard() and coordinate is not None:
            index = index * spec.mesh.size(dim) + coordinate[dim]
    return index


def _add_sums_across_shards(op, local_values: list, params: list) -> None:
    """Note [norms across shards]: for an op that reads per-tensor norms,
    given none and with a sharded param, the local sums summed over the
    shards, put in ``local_values`` as its ``tensor_sums``."""
    op_name = _op_name(op)
    if op_name not in TENSOR_NORM_OPS:
        return
    arguments = op._schema.arguments
    slot = [a.name for a in arguments].index("tensor_sums")
    if local_values[slot] is None and any(_sharded_dims(p) for p in params):
        measure = getattr(getattr(torch.ops.fused_optim, op_name),
                          "measure_tensor_lr" if op._overloadname == "tensor_lr" else "measure")
        sums = measure(*_positional(arguments, local_values), **_keywords(arguments, local_values))
        local_values[slot] = _sum_over_shards(sums, params)


def _fast_entry_takes(aligned: _LocalTensors) -> bool:
    """Whether the op's fast entry may take the local call: an eager call
    (no dispatch mode: a trace's goes through the public op) on plain local
    tensors."""
    return aligned.all_plain and not torch._C._len_torch_dispatch_stack()


def eager_entry(call, validate: bool = False):
    """The function an eager step makes ``call`` (an ``_ops.OpCall``)
    with, on its arguments: ``direct_entry`` where its params hold a
    DTensor, else the op's fast entry (or, ``validate``, its ``validate_``
    twin). The kept calls and the general path both ask here."""
    if any(map(is_dtensor, call.args[_ops.SIGNATURES[call.name].index["params"]])):
        return direct_entry(call, validate)
    return _ops.validate_entry(call.name, call.tensor_lr) if validate else _ops.fast_function(call)


def direct_entry(call, validate: bool = False):
    """The kept step's entry for ``call`` (an ``_ops.OpCall``) on DTensors,
    in place of the op's fast entry (or, ``validate``, its ``validate_``
    twin): the same arguments (positional, schema order, gradients as a
    list), the same result, True. The fast entry given DTensors reaches
    ``_local_call`` through DTensor's dispatch, which boxes every tensor of
    every list (about 2 us per param of an FSDP2 Adam step, most of what
    the DTensors add); this calls the same local call directly. What that
    dispatch would do besides, this does: the written DTensors' version
    counters are bumped, as the fast entry bumps those it is given (the
    local tensors' are bumped by the local call). Where the local tensors
    are not plain, the call goes through the dispatch as before."""
    op = public_op(call.name, call.tensor_lr)
    entry = (validate_entry if validate else fast_entry)(call.name, call.tensor_lr)
    index = {a.name: i for i, a in enumerate(op._schema.arguments)}
    # The lists the op writes (schema alias info); `grads` only to store
    # AMP's unscaled gradients, when grad_scale is given (as the fast entry).
    written = [i for i, a in enumerate(op._schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]
    grads, grad_scale = index["grads"], index["grad_scale"]

    accepted: dict = {}  # (_LocalTensors: the specs checked by the last call)

    def direct(*args) -> bool:
        local_values, aligned = _localized(op, list(args), accepted)
        if not _fast_entry_takes(aligned):
            return entry(*args)  # (through DTensor's dispatch, to _local_call)
        _add_sums_across_shards(op, local_values, aligned.params)
        entry(*local_values)
        if not validate:
            dtensors = None if aligned.every_dtensor else [spec is not None for spec in aligned.specs]
            for slot in written:
                if slot != grads or args[grad_scale] is not None:
                    increment_version(args[slot] if dtensors is None else list(compress(args[slot], dtensors)))
        return True

    return direct


def _sum_of_squares_call(op, args, kwargs):
    """``sum_of_squares`` on DTensors: the sums of the whole tensors, as a
    plain tensor (the global sum as fused_optim's clipping computes it,
    _clip.global_sum_of_squares; per tensor, each shard's sum added over
    the dimensions it is sharded on). Partial gradients are reduced first,
    as torch's clip_grad_norm_ does."""
    from torch.distributed.tensor import DTensor

    from fused_optim import _clip

    tensors, grad_scale, per_tensor = _argument_values(op, args, kwargs)
    grad_scale = _replicated_local(op._schema.name, "grad_scale", grad_scale)
    if not per_tensor:
        return _clip.global_sum_of_squares(tensors, grad_scale, op)
    whole = [_clip.without_partial(t) if isinstance(t, DTensor) else t for t in tensors]
    local = [t._local_tensor if isinstance(t, DTensor) else t for t in whole]
    return _sum_over_shards(op(local, grad_scale, True), whole)


def _positional(arguments, values) -> list:
    return [v for a, v in zip(arguments, values) if not a.kwarg_only]


def _keywords(arguments, values) -> dict:
    return {a.name: v for a, v in zip(arguments, values) if a.kwarg_only}


def register() -> None:
    """Makes DTensor dispatch our ops through ``_local_call``."""
    from torch.distributed.tensor import DTensor

    global _DTensor
    _DTensor = DTensor
    handlers = DTensor._op_dispatcher._custom_op_handlers
    for name in OP_NAMES:
        for tensor_lr in (False, True):
            handlers[public_op(name, tensor_lr)] = _local_call
    for name in TENSOR_NORM_OPS:
        for overload in MEASURE_OVERLOADS:
            handlers[getattr(getattr(torch.ops.fused_optim, name), overload)] = _local_call
    handlers[torch.ops.fused_optim.sum_of_squares.default] = _sum_of_squares_call


def register_when_imported() -> None:
    if torch.distributed.is_available():
        _on_import.when_imported(_MODULE, register)

