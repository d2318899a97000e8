"""Weight decays scaled by the constructor's lr: timm's corrected weight
decay (Lion, Lamb) and lion-pytorch's ``decoupled_weight_decay`` (Lion):
the group options, their checks and checkpoints, and what the op takes.

A decoupled decay shrinks the param by lr * weight_decay each step; with
``corrected_weight_decay`` by lr^2 / max_lr * weight_decay, max_lr being
the constructor's lr (taken as the peak of the schedule), so the decay
follows the schedule squared and equals the plain one at the peak. As in
timm's Lion and Lamb (read and tested against timm 1.0.31), each group
holds ``corrected_weight_decay`` and
``max_lr_snapshot`` (a float copy of the constructor's lr, so a tensor lr
changed in place does not move it); a checkpoint without the snapshot
takes the loading optimizer's. The op derives the decay's lr on the fly
from each step's lr (Note [corrected weight decay] in update_rules.h).

lion-pytorch's ``decoupled_weight_decay=True`` divides the weight decay by
the constructor's lr instead: the decay is lr * weight_decay / max_lr, a
constant of the group given to the op as its weight decay. lion-pytorch
keeps the flag and the lr on the optimizer, so a checkpoint carries
neither and the loading optimizer's apply; ours keeps them in the groups
(``decoupled_weight_decay``, ``max_lr_snapshot``), filled in from the
loading optimizer's defaults where a checkpoint lacks them.
"""

from __future__ import annotations

import torch

from fused_optim._keywords import to_float


def _lr_value(lr) -> float:
    # (a float copy: a tensor lr changed in place must not move it)
    return float(lr.detach()) if isinstance(lr, torch.Tensor) else float(lr)


def max_lr_snapshot(lr, corrected_weight_decay: bool = False) -> float:
    """The constructor's lr as a float; a positive one for the corrected
    decay (timm's message)."""
    max_lr = _lr_value(lr)
    if corrected_weight_decay and not max_lr > 0:
        raise ValueError(
            f"Corrected weight decay requires a positive max lr, got {max_lr}. "
            "Construct the optimizer with the peak lr."
        )
    return max_lr


def defaults(lr, corrected_weight_decay: bool) -> dict:
    """The constructor's group options."""
    return {
        "corrected_weight_decay": corrected_weight_decay,
        "max_lr_snapshot": max_lr_snapshot(lr, corrected_weight_decay),
    }


def fill_in(optimizer, keep_from_defaults=()) -> None:
    """For ``__setstate__`` (a pickle, or a checkpoint loaded: groups saved
    before the options existed, by lion-pytorch, an older timm or an older
    fused_optim): the options as timm fills them in, and the options named
    in ``keep_from_defaults`` (lion-pytorch's optimizer-wide flag) from the
    defaults."""
    optimizer.defaults.setdefault("corrected_weight_decay", False)
    optimizer.defaults.setdefault("max_lr_snapshot", max_lr_snapshot(optimizer.defaults["lr"]))
    for group in optimizer.param_groups:
        group.setdefault("corrected_weight_decay", False)
        group.setdefault("max_lr_snapshot", optimizer.defaults["max_lr_snapshot"])
        for key in keep_from_defaults:
            group.setdefault(key, optimizer.defaults.get(key, False))


def check_initial_lr(lr) -> None:
    """lion-pytorch's decoupled_weight_decay divides by the constructor's
    lr: a positive one (lion-pytorch asserts lr > 0 for every Lion)."""
    initial = _lr_value(lr)
    if not initial > 0:
        raise ValueError(
            f"decoupled_weight_decay=True divides the weight decay by the initial lr, "
            f"which must be positive, got {initial}"
        )


def lion_weight_decay(group) -> float:
    """The op's weight decay for a Lion group: lion-pytorch's divided by the
    constructor's lr with its ``decoupled_weight_decay``."""
    weight_decay = to_float(group["weight_decay"])
    if group.get("decoupled_weight_decay"):
        check_initial_lr(group["max_lr_snapshot"])
        return weight_decay / group["max_lr_snapshot"]
    return weight_decay


def op_max_lr(group, decoupled: bool = True) -> float:
    """The op's ``max_lr`` for a group: its snapshot when its decay is
    decoupled and corrected, else 0 (the plain decay). A group whose
    snapshot is not positive is refused, before the step writes."""
    if not (decoupled and group.get("corrected_weight_decay")):
        return 0.0
    return max_lr_snapshot(group["max_lr_snapshot"], True)
