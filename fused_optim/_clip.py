"""Clipping by the global gradient norm.

The norm is one reduction pass over every gradient: ``sum_of_squares``
(csrc/op_schema.cpp), one multi-tensor call per (device, DTensor layout),
each gradient unscaled in registers under AMP; the parts are added on the
first gradient's device (and, for DTensor gradients, all-reduced over their
mesh, as torch's ``clip_grad_norm_`` does through DTensor), and the square
root taken there. Two users:

- the optimizers' ``max_grad_norm`` option: the step computes the norm of
  all the optimizer's gradients and hands it to the update kernels, which
  multiply each gradient of a clipped group by
  ``min(1, max_grad_norm / (norm + 1e-6))`` in registers (never written):
  the gradients are read twice per step, not three times, and written never;
- ``fused_optim.clip_grad_norm_``, the drop-in for torch's, whose scaling
  pass writes the gradients, as torch's does.
"""

from __future__ import annotations

import math
import types
import warnings

import torch

from fused_optim import _C
from fused_optim._dtensor import add_across_shards, is_dtensor

# Not clipped: the value the kernels take for a group without max_grad_norm.
NOT_CLIPPED = math.inf


@torch.library.register_fake("fused_optim::sum_of_squares")
def _sum_of_squares_fake(tensors, grad_scale, per_tensor):
    double = any(t.dtype in (torch.float64, torch.complex128) for t in tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    for i, t in enumerate(tensors):
        if t.device != device:  # (the kernels' own check, csrc/sum_of_squares_inputs.cpp)
            raise RuntimeError(
                f"fused_optim.sum_of_squares: tensors[{i}] is on {t.device} but tensors[0] "
                f"is on {device}"
            )
    shape = (len(tensors),) if per_tensor else ()
    return torch.empty(shape, dtype=torch.float64 if double else torch.float32, device=device)


def check_max_grad_norm(value):
    """Validates the ``max_grad_norm`` option (None: no clipping; inf:
    measure the norm, clip nothing)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Invalid max_grad_norm value: {value} (a positive float or None)")
    return float(value)


def group_max_grad_norms(groups) -> list:
    """Each group's max_grad_norm as the kernels take it."""
    out = []
    for group in groups:
        value = group.get("max_grad_norm")
        out.append(NOT_CLIPPED if value is None else float(value))
    return out


def _sum_of_squares(tensors: list, grad_scale, op) -> torch.Tensor:
    """One ``sum_of_squares`` call of plain tensors through ``op``: the
    fast entry (``_C.sum_of_squares``, Note [fast op call]) in an eager
    step, the public op where the call is traced or dispatched by DTensor."""
    return op(tensors, _on_device(grad_scale, tensors[0].device), False)


def _on_device(grad_scale, device):
    """AMP's grad scale (or None) on ``device``, where the sums are made."""
    if grad_scale is not None and grad_scale.device != device:
        return grad_scale.to(device, non_blocking=True)
    return grad_scale


def without_partial(grad):
    """A DTensor gradient with any pending (Partial) reduction done, as
    torch's clip_grad_norm_ does before taking a norm."""
    from torch.distributed.tensor import Replicate

    if any(p.is_partial() for p in grad.placements):
        return grad.redistribute(grad.device_mesh, [Replicate()] * grad.device_mesh.ndim)
    return grad


def _dtensor_parts(grads: list, grad_scale, op) -> list:
    """The sums of squares of DTensor gradients, reduced over their meshes:
    a plain 0-d tensor per (mesh, placements)."""
    by_layout: dict = {}  # (mesh, placements) -> local tensors
    layout = local = None
    for grad in grads:
        # (from the spec, and a new layout looked up only where the
        # gradients' layout changes: hashing one costs about 1 us, which
        # thousands of FSDP2 gradients would pay every step)
        spec = grad._spec
        if layout is None or spec.mesh is not layout[0] or spec.placements != layout[1]:
            grad = without_partial(grad)
            spec = grad._spec
            layout = (spec.mesh, spec.placements)
            local = by_layout.setdefault(layout, [])
        local.append(grad._local_tensor)
    parts = []
    for (mesh, placements), local in by_layout.items():
        # Sharded dims hold disjoint pieces (their sums add up); replicated
        # dims hold copies (counted once).
        sharded = [d for d, placement in enumerate(placements) if placement.is_shard()]
        parts.append(add_across_shards(_sum_of_squares(local, grad_scale, op), mesh, sharded))
    return parts


def global_norm(grads: list, grad_scale=None) -> torch.Tensor:
    """The L2 norm of ``grads`` (each divided by ``grad_scale`` when given)
    as one vector: a 0-d float32 tensor (float64 if a gradient is) on the
    first gradient's device. DTensor gradients count once per element of
    the full tensor."""
    if not grads:
        return torch.tensor(0.0)
    if torch.compiler.is_compiling():
        return traced_global_norm(grads, grad_scale)
    return global_sum_of_squares(grads, grad_scale).sqrt()


def traced_global_norm(grads: list, grad_scale):
    """``global_norm`` where torch.compile traces it (a traced optimizer
    step, or ``clip_grad_norm_`` in a compiled train step): the public op
    per device, which a graph holds, where the eager path calls the fast
    entry; on DTensor gradients the op's DTensor handler returns the sum
    of the whole tensors, computed as the eager path computes it."""
    if not grads:
        return torch.zeros(())
    by_device: dict = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    parts = [
        torch.ops.fused_optim.sum_of_squares(
            tensors, None if grad_scale is None else grad_scale.to(device), False
        )
        for device, tensors in by_device.items()
    ]
    return _added(parts, grads[0].device).sqrt()


def global_sum_of_squares(grads: list, grad_scale=None, op=_C.sum_of_squares) -> torch.Tensor:
    """The square of ``global_norm``, from ``sum_of_squares`` calls made
    through ``op`` (see _sum_of_squares); also what the public op returns
    for DTensors (_dtensor.py)."""
    if not grads:
        return torch.zeros(())
    if all(type(grad) is torch.Tensor for grad in grads) and _C.on_one_device(grads):
        return _sum_of_squares(grads, grad_scale, op)  # (the common case, one call)
    plain: dict = {}
    dtensors = []
    for grad in grads:
        if not is_dtensor(grad):
            plain.setdefault(grad.device, []).append(grad)
        else:
            dtensors.append(grad)
    parts = [_sum_of_squares(tensors, grad_scale, op) for tensors in plain.values()]
    if dtensors:
        parts += _dtensor_parts(dtensors, grad_scale, op)
    return _added(parts, grads[0].device)


def _added(parts: list, device: torch.device) -> torch.Tensor:
    """The sum of the partial sums of squares ``parts`` (one per device,
    mesh or call) on ``device``, in float64 if any part is (the eager and
    the traced norm add them alike)."""
    if len(parts) == 1:
        return parts[0]
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
    return torch.stack([p.to(device, dtype) for p in parts]).sum()


def norm_of_gradients_of(grads_of, device: torch.device, grad_scale=None):
    """``global_norm`` of the gradients ``grads_of`` names (a
    ``_C.GradsOf`` of params on ``device``, none a DTensor or complex),
    read in C++ (Note [gradients read in C++]): the same call over the
    same gradients in the same order, so the same bits; or None, having
    read nothing, when a gradient is missing or sparse."""
    sum_of_squares = _C.sum_of_squares(grads_of, _on_device(grad_scale, device), False)
    return None if sum_of_squares is None else sum_of_squares.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """torch's factor: ``max_norm / (norm + 1e-6)`` clamped to at most 1
    (the kernels' clip_coefficient, update_rules.h)."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """Clips the gradient norm of an iterable of parameters: a drop-in for
    :func:`torch.nn.utils.clip_grad_norm_` (same arguments, same result, the
    gradients scaled in place), which is, as torch's, :func:`get_total_norm`
    of the gradients, then :func:`clip_grads_with_norm_` with that norm.

    For ``norm_type=2`` the norm is one multi-tensor reduction pass per
    device (``torch.ops.fused_optim.sum_of_squares``), accumulated in
    float64; torch computes a norm per tensor, then the norm of those. The
    norm is float32 (float64 for float64 gradients), also for float16 and
    bfloat16 gradients, whose norm torch computes and returns in their own
    dtype (where it overflows at 65,504 for float16). Other norm types go
    to torch's implementation. To clip without a separate pass, give the
    optimizer ``max_grad_norm`` instead: its step reads each gradient once
    for the norm and once for the update, and writes none.

    Args:
        parameters: tensors (or one tensor) whose gradients are clipped.
        max_norm (float): the largest norm the gradients keep.
        norm_type (float): the p of the p-norm; ``'inf'`` for the max norm.
        error_if_nonfinite (bool): raise if the norm is nan or inf.
        foreach (bool, optional): for torch's signature; the fused pass is
            used whatever its value for ``norm_type=2``.

    Returns:
        The total norm of the gradients (viewed as a single vector); as
        torch's, a DTensor replicated on their mesh where every gradient is
        a DTensor of one mesh.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=3,
            )
    if float(norm_type) != 2.0:
        return torch.nn.utils.clip_grad_norm_(
            parameters, max_norm, norm_type, error_if_nonfinite, foreach
        )
    grads = [p.grad for p in parameters if p.grad is not None]
    total_norm = _checked_norm(grads, error_if_nonfinite)
    if grads:
        scale_grads_(grads, clip_coefficient(total_norm, max_norm))
    return _as_torch_returns_it(total_norm, grads)


@torch.no_grad()
def get_total_norm(tensors, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   foreach: bool | None = None) -> torch.Tensor:
    """The norm of ``tensors`` viewed as one vector: a drop-in for
    :func:`torch.nn.utils.get_total_norm` (same arguments, same result),
    for clipping in two calls (a norm all-reduced over pipeline stages,
    logged, or shared) with :func:`clip_grads_with_norm_`.

    For ``norm_type=2`` the norm is one multi-tensor reduction pass per
    device, as in :func:`clip_grad_norm_` (float64 sums; a float32 norm for
    float32, float16 and bfloat16 tensors, float64 for float64); other norm
    types are torch's.

    Args:
        tensors: tensors (or one tensor), e.g. the gradients.
        norm_type (float): the p of the p-norm; ``'inf'`` for the max norm.
        error_if_nonfinite (bool): raise if the norm is nan or inf.
        foreach (bool, optional): for torch's signature; the fused pass is
            used whatever its value for ``norm_type=2``.

    Returns:
        The total norm (a DTensor replicated on their mesh where every
        tensor is a DTensor of one mesh, as torch's).
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if float(norm_type) != 2.0:
        return torch.nn.utils.get_total_norm(tensors, norm_type, error_if_nonfinite, foreach)
    return _as_torch_returns_it(_checked_norm(tensors, error_if_nonfinite), tensors)


@torch.no_grad()
def clip_grads_with_norm_(parameters, max_norm: float, total_norm: torch.Tensor,
                          foreach: bool | None = None) -> None:
    """Scales the gradients of ``parameters`` in place by
    ``min(1, max_norm / (total_norm + 1e-6))``: a drop-in for
    :func:`torch.nn.utils.clip_grads_with_norm_` (same arguments, same
    result), one ``_foreach_mul_`` per device. ``total_norm`` may be a
    DTensor (:func:`get_total_norm`'s, or torch's); the factor is then its
    full value, and DTensor gradients scale their local shards by it.

    Args:
        parameters: tensors (or one tensor) whose gradients are scaled.
        max_norm (float): the largest norm the gradients keep.
        total_norm (Tensor): the gradients' norm, e.g. from get_total_norm.
        foreach (bool, optional): for torch's signature; the scaling is one
            foreach call per device whatever its value.
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:  # (and no collective for a DTensor norm where there are none, as torch's)
        scale_grads_(grads, clip_coefficient(_full(total_norm), float(max_norm)))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if is_dtensor(t) else t


def _checked_norm(tensors: list, error_if_nonfinite: bool) -> torch.Tensor:
    """global_norm(tensors), raising torch's error where it is not finite
    and ``error_if_nonfinite`` asks (before anything is scaled)."""
    norm = global_norm(tensors)
    if error_if_nonfinite and torch.logical_or(norm.isnan(), norm.isinf()):
        raise RuntimeError(
            "The total norm of order 2.0 for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    return norm


def _as_torch_returns_it(norm: torch.Tensor, tensors: list) -> torch.Tensor:
    """The total norm as torch's ``clip_grad_norm_`` and ``get_total_norm``
    return it: where every tensor is a DTensor of one mesh (FSDP2, tensor
    parallelism), torch's norm is computed by DTensor ops and is a DTensor
    on that mesh, which callers read with ``full_tensor()``; ours is then
    the same value, replicated there. Otherwise the plain tensor (also for
    DTensors of several meshes, which torch's refuses)."""
    if not tensors or not all(is_dtensor(t) for t in tensors):
        return norm
    mesh = tensors[0].device_mesh
    if any(t.device_mesh != mesh for t in tensors):
        return norm
    from torch.distributed.tensor import DTensor, Replicate

    return DTensor.from_local(norm, mesh, [Replicate()] * mesh.ndim, run_check=False)


def scale_grads_(grads: list, factor: torch.Tensor) -> None:
    """grads *= factor, one foreach call per device (as torch's clip); a
    DTensor gradient scales its local shard (the factor is global)."""
    by_device: dict = {}
    for grad in grads:
        if is_dtensor(grad):
            grad = grad._local_tensor
        by_device.setdefault(grad.device, []).append(grad)
    for device, tensors in by_device.items():
        torch._foreach_mul_(tensors, factor.to(device))
