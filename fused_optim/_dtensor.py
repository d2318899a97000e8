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
  LARS's trust ratio, Note [per-tensor norms]) is not pointwise: on a
  sharded param the local call would see the shard's norm, so a Shard
  placement is refused for it (replicated DTensors are whole tensors).

Importing torch.distributed.tensor costs about half a second, so the
handler is registered when that module is imported, by whoever imports it
(or at once, if it already was).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch

from fused_optim._ops import OP_NAMES, TENSOR_NORM_OPS, public_op

_MODULE = "torch.distributed.tensor"
# Per-call tensor arguments: not aligned with the params.
_PER_CALL = ("state_steps", "lr", "grad_scale", "found_inf")


def _local_call(op, args, kwargs):
    from torch.distributed.tensor import DTensor, Replicate

    arguments = op._schema.arguments
    values = list(args) + [kwargs[a.name] for a in arguments[len(args):]]
    names = [a.name for a in arguments]
    params = values[names.index("params")]
    # (and the op's per-tensor scalar state, plain 0-d tensors as the steps)
    per_call = _PER_CALL + tuple(names[names.index("state_steps") + 1:names.index("group_index")])
    where = f"{op._schema.name}"
    reads_norms = op._schema.name.split("::")[-1] in TENSOR_NORM_OPS

    def replicated(name, t):
        if not isinstance(t, DTensor):
            return t
        if any(p != Replicate() for p in t.placements):
            raise RuntimeError(
                f"{where}: {name} is a DTensor with placements {t.placements}; "
                "per-call tensors must be plain tensors or replicated"
            )
        return t.to_local()

    def aligned(name, tensors):
        if len(tensors) not in (0, len(params)):
            return tensors  # the op's own length check reports it
        local = []
        for i, (t, p) in enumerate(zip(tensors, params)):
            if isinstance(p, DTensor) != isinstance(t, DTensor):
                raise RuntimeError(
                    f"{where}: params[{i}] is {'a DTensor' if isinstance(p, DTensor) else 'a plain tensor'}"
                    f" but {name}[{i}] is {'a DTensor' if isinstance(t, DTensor) else 'a plain tensor'}; "
                    "the tensors of one param must all be DTensors or all plain"
                )
            if isinstance(t, DTensor):
                if t.device_mesh != p.device_mesh or t.placements != p.placements:
                    raise RuntimeError(
                        f"{where}: {name}[{i}] has mesh {t.device_mesh} and placements "
                        f"{t.placements}, but params[{i}] has {p.device_mesh} and "
                        f"{p.placements}; an update is pointwise and needs them equal"
                    )
                if any(placement.is_partial() for placement in t.placements):
                    raise RuntimeError(
                        f"{where}: {name}[{i}] has a Partial placement {t.placements}; "
                        "reduce it (redistribute) before the optimizer step"
                    )
                if name == "params" and reads_norms and any(
                        placement.is_shard() for placement in t.placements):
                    raise RuntimeError(
                        f"{where}: params[{i}] is sharded ({t.placements}), but this op reads "
                        "each param's and gradient's norm, which a shard does not have; "
                        "not supported on sharded DTensors (FSDP2, tensor parallelism)"
                    )
                if t.shape != p.shape:
                    raise RuntimeError(
                        f"{where}: {name}[{i}] has shape {tuple(t.shape)} but params[{i}] "
                        f"has shape {tuple(p.shape)}"
                    )
                t = t._local_tensor
            local.append(t)
        return local

    local_values = []
    for argument, value in zip(arguments, values):
        if argument.name in per_call:
            if isinstance(value, list):
                value = [replicated(argument.name, t) if isinstance(t, torch.Tensor) else t for t in value]
            else:
                value = replicated(argument.name, value)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            value = aligned(argument.name, value)
        local_values.append(value)
    positional = [v for a, v in zip(arguments, local_values) if not a.kwarg_only]
    keywords = {a.name: v for a, v in zip(arguments, local_values) if a.kwarg_only}
    return op(*positional, **keywords)


def register() -> None:
    """Makes DTensor dispatch our ops through ``_local_call``."""
    from torch.distributed.tensor import DTensor

    handlers = DTensor._op_dispatcher._custom_op_handlers
    for name in OP_NAMES:
        for tensor_lr in (False, True):
            handlers[public_op(name, tensor_lr)] = _local_call


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

