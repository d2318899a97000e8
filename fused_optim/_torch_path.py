"""``fused=False``, ``differentiable=True`` and ``caution=True``: the
unfused step.

A user who passes ``fused=False`` asks for torch's unfused implementation
(the single-tensor or foreach code, chosen by ``foreach`` as torch chooses),
and ``differentiable=True`` asks for a step that autograd records. Neither
is ours to reimplement: the groups that ask for them are stepped by
``torch.optim.X.step`` itself, run on a stand-in optimizer that shares this
optimizer's ``defaults``, ``state`` and those param group dicts. Our state
layout is torch's, so the two paths can even alternate on one param.

``caution=True`` (timm's cautious Lion and Lamb) is the third: the fused
kernels do not implement the cautious mask (Note [cautious groups] in
_reference.py), so such a group is stepped by the class's ``_torch_class``,
the plain implementation in _reference.py, which takes the step's global
gradient norm for ``max_grad_norm`` instead of clipping ``.grad``.

The stand-in has no hooks: the step's hooks are this optimizer's and run
once, around its whole step. (torch wraps a class's ``step`` with the hook
runner when the first instance is made; that wrapper is peeled off.)
"""

from __future__ import annotations

import torch

from fused_optim import _arena


def path_keys(cautious: bool) -> tuple:
    """The group options that can send a group to the unfused step (a plan
    compares them each step: _base.py's raw group key); ``cautious``: the
    class takes timm's caution (Lion, Lamb). Any other class ignores a
    group's "caution", as torch.optim ignores keys it does not know."""
    return ("fused", "differentiable", "caution") if cautious else ("fused", "differentiable")


def uses_torch_path(group, cautious: bool = False) -> bool:
    """Whether a group is stepped by the unfused implementation (torch.optim's,
    or the plain one of an optimizer torch lacks); ``cautious`` as for
    ``path_keys``."""
    return (group.get("fused") is False or bool(group.get("differentiable"))
            or (cautious and bool(group.get("caution"))))


def why_unfused(group) -> tuple[str, str]:
    """(the option that sends a group, one ``uses_torch_path`` takes, to the
    unfused step, as the user wrote it; the implementation it runs)."""
    if group.get("fused") is False:
        return "fused=False", "torch.optim's implementation"
    if group.get("differentiable"):
        return "differentiable=True", "torch.optim's implementation"
    return "caution=True", "the plain (unfused) implementation"


def _without_hooks(step):
    while getattr(step, "hooked", False):
        step = step.__wrapped__
    return step


def torch_step(optimizer, groups: list, grad_norm=None) -> None:
    """Steps ``groups`` (param group dicts of ``optimizer``) with
    ``optimizer._torch_class``'s step, on ``optimizer.state``.

    Under torch.amp.GradScaler (which hands us its scale because our fused
    path unscales in the kernel) the gradients of these groups are
    unscaled here, as GradScaler.unscale_ would, or the step skipped on
    inf/NaN: torch's unfused code takes no scale. With ``grad_norm`` (the
    step's global norm), the gradients of groups with ``max_grad_norm``
    are then clipped in place, as torch's clip_grad_norm_ would (torch's
    code reads gradients only from ``.grad``); a plain implementation of
    ours (_reference.py) takes the norm instead and clips a copy, as the
    fused step leaves ``.grad`` as it is."""
    grad_scale = getattr(optimizer, "grad_scale", None)
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and bool(found_inf.item()):
        return
    if grad_scale is not None:
        # (each once: a param a group lists twice, Note [a param listed
        # twice] in _base.py)
        grads = list({id(p.grad): p.grad for g in groups for p in g["params"]
                      if p.grad is not None}.values())
        inverse = grad_scale.double().reciprocal().float()
        by_device: dict = {}
        for grad in grads:
            by_device.setdefault(grad.device, []).append(grad)
        with torch.no_grad():
            for device, tensors in by_device.items():
                torch._foreach_mul_(tensors, inverse.to(device))
    from fused_optim import _reference

    cls = optimizer._torch_class
    plain = issubclass(cls, _reference.PerTensorReference)
    if grad_norm is not None and not plain:
        from fused_optim import _clip

        for group in groups:
            if group.get("max_grad_norm") is not None:
                grads = [p.grad for p in group["params"] if p.grad is not None]
                if grads:
                    _clip.scale_grads_(grads, _clip.clip_coefficient(grad_norm, group["max_grad_norm"]))
    make_missing_mode_state(optimizer, groups)
    stand_in = cls.__new__(cls)
    stand_in.__dict__.update(
        defaults=optimizer.defaults, state=optimizer.state, param_groups=groups
    )
    if plain:
        stand_in.global_grad_norm = grad_norm
    _without_hooks(cls.step)(stand_in)


def make_missing_mode_state(optimizer, groups: list) -> None:
    """A mode that needs more state, turned on in a group mid-run (Adam's
    amsgrad, RMSprop's centered or momentum): a param that has state but
    not the mode's gets it as the fused groups make it (its class's
    ``_initial_state_value``), in the param's dtype as torch's code keeps
    it. torch.optim's code raises KeyError there instead, after
    updating the groups before."""
    for group in groups:
        names = [name for name in optimizer._state_names(optimizer._mode(group))
                 if name not in optimizer._made_by_torch_when_missing]
        for param in group["params"]:
            state = optimizer.state.get(param)
            if param.grad is None or not state:
                continue  # (torch's code makes a param's first state itself)
            for name in names:
                if name not in state:
                    state[name] = _arena.NewTensor(
                        param, param.dtype, optimizer._initial_state_value(group, param)).make()
