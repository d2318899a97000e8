"""RAdam: drop-in replacement for torch.optim.RAdam."""

from __future__ import annotations

import operator

import torch

from fused_optim import _docs
from fused_optim._base import FusedOptimizer
from fused_optim._clip import check_max_grad_norm
from fused_optim._keywords import check_adam_arguments, check_implementation_keywords, to_float
from fused_optim._precision import check_precision_keywords

__all__ = ["RAdam"]

_BETAS_EPS_WD = operator.itemgetter("betas", "eps", "weight_decay")


class RAdam(FusedOptimizer):
    _op_name = "radam_"
    _torch_class = torch.optim.RAdam

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        # Same checks, order and messages as torch.optim.RAdam.
        check_adam_arguments(lr, betas, eps, weight_decay)
        precision = check_precision_keywords(master_weights, state_dtype, stochastic_rounding)
        # (torch.optim.RAdam has no fused keyword: its fused step is ours)
        check_implementation_keywords(
            "RAdam", foreach=foreach, fused=None, differentiable=differentiable, precision=precision
        )
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "decoupled_weight_decay": decoupled_weight_decay,
            "differentiable": differentiable,
            **precision,
            "max_grad_norm": check_max_grad_norm(max_grad_norm),
        }
        super().__init__(params, defaults)

    _setstate_defaults = {
        "foreach": None, "maximize": False, "differentiable": False,
        "decoupled_weight_decay": False, "capturable": False,
    }

    def _state_names(self, mode) -> tuple:
        return ("exp_avg", "exp_avg_sq")

    def _hyperparameter_lists(self, groups) -> list:
        betas, eps, weight_decay = zip(*map(_BETAS_EPS_WD, groups))
        beta1, beta2 = zip(*betas)
        return [list(map(float, values)) for values in (beta1, beta2, eps, weight_decay)]

    def _hyperparameters(self, group) -> dict:
        beta1, beta2 = group["betas"]
        return {
            "beta1": to_float(beta1),
            "beta2": to_float(beta2),
            "eps": to_float(group["eps"]),
            "weight_decay": to_float(group["weight_decay"]),
        }


RAdam.__doc__ = (
    r"""RAdam (Liu et al., 2020), fused: drop-in for :class:`torch.optim.RAdam`.

    torch.optim has no fused RAdam; its for-each version makes several
    passes over memory per step, this one makes one.

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (-\text{ if } \textit{maximize}) \\
            &\textbf{if } \textit{decoupled}: \theta_{t-1} \leftarrow
                \theta_{t-1}(1 - \gamma\lambda)
             \quad \textbf{else}: g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
            &v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
            &\rho_\infty \leftarrow 2/(1-\beta_2) - 1, \quad
             \rho_t \leftarrow \rho_\infty - 2t\beta_2^t/(1-\beta_2^t) \\
            &\textbf{if } \rho_t > 5: \theta_t \leftarrow \theta_{t-1} -
                \gamma\,\frac{m_t}{1-\beta_1^t}\,
                \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon}\, r_t,
             \quad r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}
                {(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
            &\textbf{else}: \theta_t \leftarrow \theta_{t-1} -
                \gamma\,\frac{m_t}{1-\beta_1^t}
       \end{aligned}

    Symbols: :math:`\gamma` ``lr``, :math:`\beta_1, \beta_2` ``betas``,
    :math:`\epsilon` ``eps``, :math:`\lambda` ``weight_decay``; state
    :math:`m` ``exp_avg``, :math:`v` ``exp_avg_sq``, :math:`t` ``step``.

    Conventions: as torch.optim (not the paper's Algorithm 2): :math:`\epsilon`
    is added to :math:`\sqrt{v_t}` (the paper has none), and the threshold
    is :math:`\rho_t > 5` (the paper's :math:`> 4`). The choice between the
    two updates depends on the step and :math:`\beta_2` only, so it is made
    once per tensor.

    Args:
        """
    + _docs.PARAMS
    + r"""
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-3).
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)`,
            decay rates of the first and second moment averages
            (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon`, added to the denominator for
            numerical stability (default: 1e-8).
        weight_decay (float, optional): :math:`\lambda` (default: 0).
        decoupled_weight_decay (bool, optional): decay the params directly
            (as AdamW) instead of adding :math:`\lambda\theta` to the gradient
            (default: False).
        """
    + _docs.implementation("foreach")
    + "\n        "
    + _docs.MAXIMIZE
    + "\n        "
    + _docs.implementation("capturable", "differentiable")
    + "\n        "
    + _docs.PRECISION
    + "\n"
    + _docs.FUSED_NOTE.format(op="radam_")
    + """
    References: Liu et al., "On the Variance of the Adaptive Learning Rate
    and Beyond", ICLR 2020, https://arxiv.org/abs/1908.03265.
"""
)
