"""The implementation keywords (foreach, fused, capturable, differentiable):
torch.optim's checks of them, what each does here, and how they combine
with our precision options; and hyperparameters as the step reads them."""

from __future__ import annotations

import torch

from fused_optim import _torch_path
from fused_optim._clip import check_max_grad_norm
from fused_optim._precision import PRECISION_DEFAULTS, check_precision_keywords


def check_implementation_keywords(name: str, *, foreach, fused, differentiable, precision: dict,
                                  caution: bool = False):
    """torch.optim's checks of the implementation keywords (same exception
    types and messages), and ours for combining them (and timm's
    ``caution``) with our precision options. What each keyword then does:
    Note [implementation keywords]."""
    if fused:
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    check_torch_path_precision(
        name, {"fused": fused, "differentiable": differentiable, "caution": caution, **precision},
        cautious=True)


# Note [implementation keywords]
# - fused=None or True: our fused step (the only thing fused can mean here).
# - foreach=True with fused=None: also the fused step. foreach asks for a
#   multi-tensor implementation; ours is one, and a strictly faster one,
#   with the same math and state. Its arguments are checked as torch
#   checks them with foreach=True: Adam and AdamW refuse a tensor lr or
#   betas with capturable=False, as torch.optim does (its foreach code
#   cannot read them), although our step could. Accepting them would make
#   code that torch.optim refuses, and fail torch's own optimizer tests.
# - fused=False: torch.optim's own unfused step for that group, with
#   foreach as given (None lets torch choose, as it would): the user asked
#   for torch's code, so it runs (_torch_path.py). Same for
#   differentiable=True, which only torch's code can honour.
# - caution=True (timm's Lion and Lamb): the plain per-tensor step of
#   _reference.py, the fused kernels having no cautious mask (Note
#   [cautious groups] there).
# - capturable=True: on CUDA our step never syncs with the host whatever
#   the flag; on CPU params it changes nothing, as for torch's fused step
#   (torch's foreach and single-tensor code refuse CPU params with it, a
#   limit of that code, not of the request).


def chosen_precision_options(group) -> list:
    """The names of the precision options ``group`` sets (off: their
    defaults, None or False)."""
    return [k for k, v in PRECISION_DEFAULTS.items() if group.get(k, v) not in (v, None, False)]


def chosen_fused_only_options(group) -> list:
    """The names of the options ``group`` sets that only the fused step has:
    its precision options, and ``max_grad_norm`` (torch.optim's code has
    neither, so a group that asks for one needs the fused step)."""
    chosen = chosen_precision_options(group)
    if group.get("max_grad_norm") is not None:
        chosen.append("max_grad_norm")
    return chosen


def check_torch_path_precision(name: str, group, cautious: bool) -> None:
    """Our precision options live in our kernels only: a group stepped by
    the unfused implementation (torch.optim's, or our plain one for
    caution=True, ``cautious`` as for _torch_path.path_keys) cannot have
    them."""
    if not _torch_path.uses_torch_path(group, cautious):
        return
    chosen = chosen_precision_options(group)
    if chosen:
        asked, runs = _torch_path.why_unfused(group)
        raise ValueError(
            f"fused_optim.{name}: {', '.join(chosen)} need(s) the fused step, but "
            f"{asked} runs {runs}, which has no such option"
        )


def check_group_options(name: str, group, cautious: bool) -> None:
    """The constructor's checks of our options (the precision options,
    ``max_grad_norm``), on a group's (``cautious`` as for
    check_torch_path_precision)."""
    check_group_precision(name, group, cautious)
    try:
        check_max_grad_norm(group.get("max_grad_norm"))
    except ValueError as error:
        raise ValueError(f"fused_optim.{name}: {error}") from None


def check_group_precision(name: str, group, cautious: bool) -> None:
    """The constructor's checks of the precision options, on a group's."""
    try:
        check_precision_keywords(group.get("master_weights", False), group.get("state_dtype"),
                                 group.get("stochastic_rounding", False))
    except ValueError as error:
        raise ValueError(f"fused_optim.{name}: {error}") from None
    check_torch_path_precision(name, group, cautious)


def check_tensor_lr(lr) -> None:
    """torch.optim's first check, with its message: a tensor lr holds one
    element. (Each class then compares lr with 0 as its torch.optim
    counterpart does: SGD's ``lr < 0.0`` lets a NaN through, Adam's
    ``not 0.0 <= lr`` does not.)"""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")


def check_adam_arguments(lr, betas, eps, weight_decay) -> None:
    """torch.optim's checks shared by Adam, AdamW, RAdam and NAdam, in its
    order, with its messages."""
    check_tensor_lr(lr)
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    check_betas(betas)
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def check_lamb_arguments(lr, betas, eps, weight_decay) -> None:
    """timm's Lamb's checks, in its order, with its messages; then
    ``betas`` as torch.optim's Adam checks them (timm's takes any: a beta
    of 1 divides by zero in the bias correction)."""
    for name, value in (("learning rate", lr), ("epsilon", eps), ("weight_decay", weight_decay)):
        check_timm_scalar(name, value)
    check_betas(betas)


def check_betas(betas) -> None:
    """torch.optim's Adam's check of ``betas``, with its messages."""
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")


def check_timm_scalar(name: str, value) -> None:
    """timm's check of a scalar option (``_validate_scalar`` in
    timm/optim/_helpers.py, timm 1.0), with its messages: a tensor holds
    one element, the value is not negative. A NaN, which timm lets
    through, is refused too."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar or scalar tensor.")
        number = float(value.detach().cpu())
    else:
        number = float(value)
    if not number >= 0.0:
        raise ValueError(f"Invalid {name}: {value}")


def check_group_lr(name: str, gi: int, lr) -> None:
    """torch.optim checks a tensor lr's size when the group is made; one
    assigned later is checked at each step before anything is written
    (torch's code then raises part-way through the update)."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(
            f"fused_optim.{name}: param group {gi} has an lr tensor of {lr.numel()} elements; "
            "Tensor lr must be 1-element"
        )


def to_float(value) -> float:
    """A hyperparameter as a Python float (torch allows 1-element tensors)."""
    if type(value) is float:  # (the usual case, read every step)
        return value
    return value.item() if isinstance(value, torch.Tensor) else float(value)
