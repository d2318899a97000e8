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
- ``sum_of_squares`` (clipping's reduction, which a traced step calls on
  DTensor gradients) returns the sums of the whole tensors too, as a plain
  tensor: the same global sum as the eager step's (_clip.py).

Importing torch.distributed.tensor costs about half a second, so the
handler is registered when that module is imported, by whoever imports it
(or at once, if it already was).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch

from fused_optim._ops import MEASURE_OVERLOADS, OP_NAMES, TENSOR_NORM_OPS, fast_entry, public_op

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


def _sum_over_shards(sums: torch.Tensor, params: list) -> torch.Tensor:
    """``sums`` (sums of squares of the local shards, k entries per tensor
    of ``params``: entry j * n + i is tensor i's j-th; the norm ops' [2n]
    sums hold param i at i and its gradient or update at n + i) made those
    of the whole tensors: each tensor's entries summed over the ranks of
    each mesh dimension it is sharded on. Tensors sharded alike share one
    all-reduce per dimension: a functional collective, which a traced step
    (torch.compile) keeps in its graph; an in-place ``dist.all_reduce``
    traced there would leave the sums unreduced."""
    import torch.distributed._functional_collectives as funcol

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
        for dim in dims:
            part = funcol.all_reduce(part, "sum", (mesh, dim))
        if whole:
            sums = part
        else:
            sums = sums.index_copy(0, index, part)
    return sums


def _argument_values(op, args, kwargs) -> list:
    """A call's argument values in schema order."""
    return list(args) + [kwargs[a.name] for a in op._schema.arguments[len(args):]]


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


def _kind(t) -> str:
    return "a DTensor" if is_dtensor(t) else "a plain tensor"


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (False while torch.distributed.tensor is
    not imported: then none exists). Cheap: the step asks it per tensor."""
    return _DTensor is not None and type(t) is not torch.Tensor and isinstance(t, _DTensor)


class _LocalTensors:
    """The lists aligned with a call's params, made local: each DTensor
    checked against its param and replaced by its local shard. The checks
    run for every tensor of every list, every step (an FSDP2 step over
    thousands of params pays them), so they read what the DTensors' specs
    hold (a DTensor's ``shape`` takes a dispatch, about 1 us) and compare
    meshes by identity first (usually one object for all)."""

    def __init__(self, where: str, params: list) -> None:
        self.where = where
        self.params = params
        # each param's spec, or None for a plain param
        self.specs = [p._spec if is_dtensor(p) else None for p in params]
        self.all_plain = True  # every local tensor a torch.Tensor or Parameter (so far)
        for i, spec in enumerate(self.specs):
            # (the other lists' placements must equal their param's)
            if spec is not None and any(placement.is_partial() for placement in spec.placements):
                raise RuntimeError(
                    f"{where}: params[{i}] has a Partial placement {spec.placements}; "
                    "reduce it (redistribute) before the optimizer step"
                )

    def __call__(self, name: str, tensors: list) -> list:
        if len(tensors) not in (0, len(self.params)):
            # The op's own length check reports it; unwrapped, so that the
            # op is not dispatched to this handler again (without end).
            return [self._unchecked_local(t) for t in tensors]
        local = []
        for i, (t, spec) in enumerate(zip(tensors, self.specs)):
            if spec is None:
                if is_dtensor(t):
                    self._raise_kinds(name, i, t)
            else:
                if not is_dtensor(t):
                    self._raise_kinds(name, i, t)
                own = t._spec
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
                t = t._local_tensor
            local.append(self._noted(t))
        return local

    def _unchecked_local(self, t):
        return self._noted(t._local_tensor if is_dtensor(t) else t)

    def _noted(self, local):
        """``local``, having noted whether it is plain."""
        if type(local) is not torch.Tensor and type(local) is not torch.nn.Parameter:
            self.all_plain = False  # (a trace's tensors, or another subclass)
        return local

    def _raise_kinds(self, name: str, i: int, t) -> None:
        raise RuntimeError(
            f"{self.where}: params[{i}] is {_kind(self.params[i])} but {name}[{i}] is "
            f"{_kind(t)}; the tensors of one param must all be DTensors or all plain"
        )


def _local_call(op, args, kwargs):
    arguments = op._schema.arguments
    values = _argument_values(op, args, kwargs)
    names = [a.name for a in arguments]
    params = values[names.index("params")]
    # (and the op's per-tensor scalar state, plain 0-d tensors as the steps)
    per_call = _PER_CALL + tuple(names[names.index("state_steps") + 1:names.index("group_index")])
    where = f"{op._schema.name}"
    op_name = op._schema.name.split("::")[-1]
    aligned = _LocalTensors(where, params)

    local_values = []
    for argument, value in zip(arguments, values):
        if argument.name in per_call:
            if isinstance(value, list):
                value = [_replicated_local(where, argument.name, t) if isinstance(t, torch.Tensor) else t
                         for t in value]
            else:
                value = _replicated_local(where, argument.name, value)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            value = aligned(argument.name, value)
        local_values.append(value)
    if op._overloadname in MEASURE_OVERLOADS:
        # The sums of the whole tensors.
        return _sum_over_shards(
            op(*_positional(arguments, local_values), **_keywords(arguments, local_values)), params)
    if (op_name in TENSOR_NORM_OPS and local_values[names.index("tensor_sums")] is None
            and any(_sharded_dims(p) for p in params)):
        # Note [norms across shards]: the local sums, summed over the
        # shards, then the update with them.
        measure = getattr(getattr(torch.ops.fused_optim, op_name),
                          "measure_tensor_lr" if op._overloadname == "tensor_lr" else "measure")
        sums = measure(*_positional(arguments, local_values), **_keywords(arguments, local_values))
        local_values[names.index("tensor_sums")] = _sum_over_shards(sums, params)
    if aligned.all_plain and not torch._C._len_torch_dispatch_stack():
        # An eager call on plain local tensors: the op's fast entry
        # (Note [fast op call]; positional, in schema order), which skips
        # the dispatcher's per-tensor boxing of a public op call.
        fast_entry(op_name, op._overloadname == "tensor_lr")(*local_values)
        return None
    return op(*_positional(arguments, local_values), **_keywords(arguments, local_values))


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


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers the handler right after torch.distributed.tensor is
    imported (and steps aside: the other finders find the module)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_imported() -> None:
    if not torch.distributed.is_available():
        return
    if _MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())

