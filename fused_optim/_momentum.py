"""The state bookkeeping of optimizers built on SGD's momentum buffer (SGD,
Lars): a mixin of FusedOptimizer, written once."""

from __future__ import annotations


class MomentumBufferState:
    """Mode, state names and state creation of an op with an optional
    ``momentum_buffer`` (on when the group's momentum is not 0), Nesterov
    as its mode keyword, and no step counter except with stochastic
    rounding."""

    _has_step = False
    _mode_keys = ("momentum", "nesterov")

    def _mode(self, group) -> tuple:
        uses_momentum = group["momentum"] != 0
        # (a group may set momentum 0 under a nesterov default: torch and
        # timm then ignore nesterov, and so do we)
        return (uses_momentum, uses_momentum and bool(group["nesterov"]))

    def _op_modes(self, mode) -> dict:
        return {"nesterov": mode[1]}

    def _state_names(self, mode) -> tuple:
        return ("momentum_buffer",) if mode[0] else ()

    _made_by_torch_when_missing = ("momentum_buffer",)

    def _keeps_step(self, group) -> bool:
        # The update uses no step count (torch's SGD keeps none). With
        # stochastic rounding we keep one (our own state, saved under
        # "step"): the rounding's random bits are drawn by it, so they
        # change from step to step.
        return bool(group.get("stochastic_rounding"))

    # torch.optim (and timm) create the buffer on the first step as a copy
    # of the (decayed, scaled) gradient. We make it zero-filled and tell the
    # op it is new, so the kernel writes the gradient into it in the same
    # pass.
    _op_writes_new_state = True
