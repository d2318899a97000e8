"""Adagrad: drop-in replacement for torch.optim.Adagrad."""

from __future__ import annotations

import torch
from torch.optim.adagrad import adagrad as _torch_adagrad

from fused_optim import _docs
from fused_optim._base import FusedOptimizer
from fused_optim._clip import check_max_grad_norm
from fused_optim._keywords import check_implementation_keywords, check_tensor_lr, to_float
from fused_optim._planning import new_step
from fused_optim._precision import check_precision_keywords

__all__ = ["Adagrad"]


class Adagrad(FusedOptimizer):
    _op_name = "adagrad_"
    _torch_class = torch.optim.Adagrad
    _fused_differentiable_error = "adagrad with fused=True does not support differentiable=True"
    _supports_sparse = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        # Same checks, order and messages as torch.optim.Adagrad.
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        precision = check_precision_keywords(master_weights, state_dtype, stochastic_rounding)
        check_implementation_keywords(
            "Adagrad", foreach=foreach, fused=fused, differentiable=differentiable, precision=precision
        )
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": fused,
            **precision,
            "max_grad_norm": check_max_grad_norm(max_grad_norm),
        }
        super().__init__(params, defaults)
        # As torch.optim.Adagrad, state exists from construction on, master
        # copies included: a fresh optimizer's state_dict (the template that
        # torch.distributed.checkpoint loads into) then lists every key a
        # checkpoint of it has. Checked at the first step, as loaded ones
        # (Note [a loaded master copy]).
        self._make_all_state()

    _setstate_defaults = {"foreach": None, "maximize": False, "differentiable": False, "fused": None}

    def share_memory(self) -> None:
        """Calls tensor.share_memory_() on the state sum tensors (and on the
        master copies, which the step reads instead of the params: shared
        params with private masters would each be overwritten)."""
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                state["sum"].share_memory_()
                if "master_param" in state:
                    state["master_param"].share_memory_()

    _hyperparameters_are_group_options = True

    def _state_names(self, mode) -> tuple:
        return ("sum",)

    def _init_scalar_state(self, param, group, state) -> None:
        # Where torch.optim.Adagrad puts it: on the param's device for a
        # fused step, on the CPU for its unfused code (which reads it with
        # .item(): a meta device, for one, refuses that). The same for a
        # CPU param, which is not asked where it is stepped (as Adagrad
        # makes its state at construction, for every param at once).
        device = param.device
        if "step" not in state:
            state["step"] = new_step(None if device.type != "cpu" and self._unfused(group)
                                     else device)

    def _initial_state_value(self, group, param):
        # The group's own value (torch.optim uses the constructor's value for
        # every group, ignoring a group's override).
        value = group.get("initial_accumulator_value", self.defaults["initial_accumulator_value"])
        return complex(value, value) if param.is_complex() else value

    def _check_sparse(self, group, param, grad, is_new: bool) -> None:
        if group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")

    def _sparse_step(self, group, params, grads, is_new) -> None:
        # Sparse gradients go through torch.optim's own single-tensor Adagrad:
        # a sparse update touches few rows, so there is nothing to fuse.
        states = [self.state[p] for p in params]
        _torch_adagrad(
            params,
            grads,
            [s["sum"] for s in states],
            [s["step"] for s in states],
            has_sparse_grad=True,
            foreach=False,
            lr=to_float(group["lr"]),
            weight_decay=to_float(group["weight_decay"]),
            lr_decay=group["lr_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )


Adagrad.__doc__ = (
    r"""Adagrad (Duchi et al., 2011), fused: drop-in for :class:`torch.optim.Adagrad`.

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}
                \quad (-\text{ if } \textit{maximize}) \\
            &\tilde\gamma_t \leftarrow \gamma / (1 + (t-1)\eta) \\
            &s_t \leftarrow s_{t-1} + g_t^2 \\
            &\theta_t \leftarrow \theta_{t-1} - \tilde\gamma_t\, g_t / (\sqrt{s_t} + \epsilon)
       \end{aligned}

    Symbols: :math:`\gamma` ``lr``, :math:`\eta` ``lr_decay``, :math:`\lambda`
    ``weight_decay``, :math:`\epsilon` ``eps``, :math:`s_0`
    ``initial_accumulator_value``; state :math:`s` ``sum``, :math:`t` ``step``.

    Conventions: :math:`\epsilon` is added outside the square root (as
    torch.optim; optax adds it inside). The state exists from construction
    on, as in torch.optim.

    Difference from torch.optim, on purpose: each param's sum starts from
    its own group's ``initial_accumulator_value``. torch.optim.Adagrad
    starts every param from the constructor's value, ignoring a value given
    in a param group (at construction or through ``add_param_group``),
    although it keeps that value in the group; we honour what the group
    says. Groups that do not set it start from the constructor's value, as
    in torch.

    Args:
        """
    + _docs.PARAMS
    + r"""
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-2).
        lr_decay (float, optional): :math:`\eta` (default: 0).
        weight_decay (float, optional): :math:`\lambda`, L2 penalty (default: 0).
        initial_accumulator_value (float, optional): :math:`s_0` (default: 0).
        eps (float, optional): :math:`\epsilon` (default: 1e-10).
        """
    + _docs.MAXIMIZE
    + "\n        "
    + _docs.implementation("foreach", "differentiable", "fused")
    + "\n        "
    + _docs.PRECISION
    + r"""

    Sparse gradients are supported as in torch.optim (through its
    single-tensor implementation, unfused); as there, not with weight decay.
"""
    + _docs.FUSED_NOTE.format(op="adagrad_")
    + """
    References: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for
    Online Learning and Stochastic Optimization", JMLR 2011.
"""
)
