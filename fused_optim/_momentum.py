"""The state bookkeeping of optimizers built on SGD's momentum buffer (SGD,
Lars): a mixin of FusedOptimizer, written once."""

from __future__ import annotations

import torch

from fused_optim._planning import new_step


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

    def _init_state(self, param, group, state, dtype) -> bool:
        if self._keeps_step(group):
            state.setdefault("step", new_step(param.device))
        if not self._mode(group)[0] or "momentum_buffer" in state:
            return False
        # torch.optim (and timm) create the buffer on the first step as a
        # copy of the (decayed, scaled) gradient. We allocate it zero-filled
        # and tell the op it is new, so the kernel writes the gradient into
        # it in the same pass.
        state["momentum_buffer"] = torch.zeros_like(param, dtype=dtype,
                                                    memory_format=torch.preserve_format)
        return True
