"""RMSprop: drop-in replacement for torch.optim.RMSprop."""

from __future__ import annotations

import torch

from fused_optim import _docs
from fused_optim._base import FusedOptimizer
from fused_optim._clip import check_max_grad_norm
from fused_optim._keywords import check_implementation_keywords, check_tensor_lr
from fused_optim._precision import check_precision_keywords

__all__ = ["RMSprop"]


class RMSprop(FusedOptimizer):
    _op_name = "rmsprop_"
    _torch_class = torch.optim.RMSprop

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        # Same checks, order and messages as torch.optim.RMSprop.
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        precision = check_precision_keywords(master_weights, state_dtype, stochastic_rounding)
        # (torch.optim.RMSprop has no fused keyword: its fused step is ours)
        check_implementation_keywords(
            "RMSprop", foreach=foreach, fused=None, differentiable=differentiable, precision=precision
        )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            **precision,
            "max_grad_norm": check_max_grad_norm(max_grad_norm),
        }
        super().__init__(params, defaults)

    _setstate_defaults = {
        "momentum": 0, "centered": False, "foreach": None, "maximize": False,
        "differentiable": False, "capturable": False,
    }

    _mode_keys = ("centered", "momentum")
    _hyperparameters_are_group_options = True

    def _mode(self, group) -> tuple:
        return (bool(group["centered"]), group["momentum"] > 0)

    def _op_modes(self, mode) -> dict:
        return {"centered": mode[0]}

    def _state_names(self, mode) -> tuple:
        centered, uses_momentum = mode
        # (torch.optim's order of the state keys)
        return (
            ("square_avg",)
            + (("momentum_buffer",) if uses_momentum else ())
            + (("grad_avg",) if centered else ())
        )

RMSprop.__doc__ = (
    r"""RMSprop (Hinton, 2012), fused: drop-in for :class:`torch.optim.RMSprop`.

    torch.optim has no fused RMSprop; its for-each version makes several
    passes over memory per step, this one makes one.

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}
                \quad (-\text{ if } \textit{maximize}) \\
            &v_t \leftarrow \alpha v_{t-1} + (1-\alpha) g_t^2 \\
            &\textbf{if } \textit{centered}: \bar g_t \leftarrow \alpha \bar g_{t-1}
                + (1-\alpha) g_t, \quad d_t \leftarrow \sqrt{v_t - \bar g_t^2} + \epsilon
             \quad \textbf{else}: d_t \leftarrow \sqrt{v_t} + \epsilon \\
            &\textbf{if } \mu > 0: b_t \leftarrow \mu b_{t-1} + g_t / d_t, \quad
                \theta_t \leftarrow \theta_{t-1} - \gamma b_t
             \quad \textbf{else}: \theta_t \leftarrow \theta_{t-1} - \gamma g_t / d_t
       \end{aligned}

    Symbols: :math:`\gamma` ``lr``, :math:`\alpha` ``alpha``, :math:`\epsilon`
    ``eps``, :math:`\lambda` ``weight_decay``, :math:`\mu` ``momentum``;
    state :math:`v` ``square_avg``, :math:`\bar g` ``grad_avg`` (centered),
    :math:`b` ``momentum_buffer`` (momentum > 0), ``step`` (counted, as in
    torch, though the update does not use it).

    Conventions: :math:`\epsilon` is added outside the square root (as
    torch.optim and Keras; TensorFlow v1 adds it inside).

    Args:
        """
    + _docs.PARAMS
    + r"""
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-2).
        alpha (float, optional): smoothing constant :math:`\alpha` (default: 0.99).
        eps (float, optional): :math:`\epsilon` (default: 1e-8).
        weight_decay (float, optional): :math:`\lambda`, L2 penalty (default: 0).
        momentum (float, optional): :math:`\mu` (default: 0).
        centered (bool, optional): normalize by an estimate of the gradient's
            variance instead of its second moment (default: False).
        """
    + _docs.MAXIMIZE
    + "\n        "
    + _docs.implementation("capturable", "foreach", "differentiable")
    + "\n        "
    + _docs.PRECISION
    + _docs.FUSED_NOTE.format(op="rmsprop_")
    + """
    References: Hinton, Srivastava & Swersky, "Neural Networks for Machine
    Learning", lecture 6e, 2012; Graves, "Generating Sequences With Recurrent
    Neural Networks", 2013 (centered variant).
"""
)
