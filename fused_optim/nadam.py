"""NAdam: drop-in replacement for torch.optim.NAdam."""

from __future__ import annotations

import operator

import torch

from fused_optim import _docs
from fused_optim._base import FusedOptimizer
from fused_optim._clip import check_max_grad_norm
from fused_optim._keywords import check_adam_arguments, check_implementation_keywords, to_float
from fused_optim._planning import new_step
from fused_optim._precision import check_precision_keywords

__all__ = ["NAdam"]

_HYPER = operator.itemgetter("betas", "eps", "weight_decay", "momentum_decay")


class NAdam(FusedOptimizer):
    _op_name = "nadam_"
    _torch_class = torch.optim.NAdam
    # torch's per-param 0-d mu_product (the product of the momentum
    # schedule): read and updated by the op (Note [per-tensor scalar state]).
    _scalar_state_names = ("mu_product",)

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
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
        # Same checks, order and messages as torch.optim.NAdam.
        check_adam_arguments(lr, betas, eps, weight_decay)
        if not 0.0 <= momentum_decay:
            raise ValueError(f"Invalid momentum_decay value: {momentum_decay}")
        precision = check_precision_keywords(master_weights, state_dtype, stochastic_rounding)
        # (torch.optim.NAdam has no fused keyword: its fused step is ours)
        check_implementation_keywords(
            "NAdam", foreach=foreach, fused=None, differentiable=differentiable, precision=precision
        )
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "momentum_decay": momentum_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            **precision,
            "max_grad_norm": check_max_grad_norm(max_grad_norm),
        }
        super().__init__(params, defaults)

    _setstate_defaults = {
        "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
        "decoupled_weight_decay": False,
    }

    def __setstate__(self, state):
        super().__setstate__(state)
        for value in self.state.values():
            # (torch: a checkpoint's float mu_product becomes a tensor)
            if isinstance(value, dict) and "mu_product" in value and not torch.is_tensor(value["mu_product"]):
                value["mu_product"] = torch.tensor(float(value["mu_product"]), dtype=new_step().dtype)

    def _state_names(self, mode) -> tuple:
        return ("exp_avg", "exp_avg_sq")

    def _init_scalar_state(self, param, group, state) -> None:
        # torch: step 0 and mu_product 1, 0-d, in its scalar dtype (here
        # where the op reads them: the CPU for CPU params).
        state.setdefault("step", new_step(param.device))
        if "mu_product" not in state:
            state["mu_product"] = new_step(param.device).fill_(1.0)

    def _hyperparameter_lists(self, groups) -> list:
        betas, eps, weight_decay, momentum_decay = zip(*map(_HYPER, groups))
        beta1, beta2 = zip(*betas)
        return [list(map(float, values))
                for values in (beta1, beta2, eps, weight_decay, momentum_decay)]

    def _hyperparameters(self, group) -> dict:
        beta1, beta2 = group["betas"]
        return {
            "beta1": to_float(beta1),
            "beta2": to_float(beta2),
            "eps": to_float(group["eps"]),
            "weight_decay": to_float(group["weight_decay"]),
            "momentum_decay": to_float(group["momentum_decay"]),
        }


NAdam.__doc__ = (
    r"""NAdam (Dozat, 2016), fused: drop-in for :class:`torch.optim.NAdam`.

    torch.optim has no fused NAdam; its for-each version makes several
    passes over memory per step, this one makes one.

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (-\text{ if } \textit{maximize}) \\
            &\textbf{if } \textit{decoupled}: \theta_{t-1} \leftarrow
                \theta_{t-1}(1 - \gamma\lambda)
             \quad \textbf{else}: g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &\mu_t \leftarrow \beta_1\big(1 - \tfrac12\, 0.96^{t\psi}\big), \quad
             \mu_{t+1} \leftarrow \beta_1\big(1 - \tfrac12\, 0.96^{(t+1)\psi}\big) \\
            &\Pi_t \leftarrow \Pi_{t-1}\,\mu_t \\
            &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
            &v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
            &\theta_t \leftarrow \theta_{t-1}
                - \gamma\frac{1-\mu_t}{1-\Pi_t}\,\frac{g_t}{d_t}
                - \gamma\frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\,\frac{m_t}{d_t},
             \quad d_t = \sqrt{v_t/(1-\beta_2^t)} + \epsilon
       \end{aligned}

    Symbols: :math:`\gamma` ``lr``, :math:`\beta_1, \beta_2` ``betas``,
    :math:`\epsilon` ``eps``, :math:`\lambda` ``weight_decay``, :math:`\psi`
    ``momentum_decay``; state :math:`m` ``exp_avg``, :math:`v`
    ``exp_avg_sq``, :math:`\Pi` ``mu_product`` (a 0-d float32 tensor per
    param, as torch's, multiplied in float32 as torch does), :math:`t`
    ``step``.

    Conventions: as torch.optim: the momentum schedule with ``0.96`` and
    ``momentum_decay`` (Dozat's), :math:`\epsilon` added to the
    bias-corrected root. ``mu_product`` is checkpointed as torch does; one
    loaded from a checkpoint is kept in float32 (float64 for float64
    params), where torch's loader would cast it to a float16/bfloat16
    param's dtype.

    Args:
        """
    + _docs.PARAMS
    + r"""
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 2e-3).
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)`,
            decay rates of the first and second moment averages
            (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon`, added to the denominator for
            numerical stability (default: 1e-8).
        weight_decay (float, optional): :math:`\lambda` (default: 0).
        momentum_decay (float, optional): :math:`\psi` (default: 4e-3).
        decoupled_weight_decay (bool, optional): decay the params directly
            (as AdamW; NAdamW) instead of adding :math:`\lambda\theta` to the
            gradient (default: False).
        """
    + _docs.implementation("foreach")
    + "\n        "
    + _docs.MAXIMIZE
    + "\n        "
    + _docs.implementation("capturable", "differentiable")
    + "\n        "
    + _docs.PRECISION
    + "\n"
    + _docs.FUSED_NOTE.format(op="nadam_")
    + """
    References: Dozat, "Incorporating Nesterov Momentum into Adam", ICLR 2016
    workshop, https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ.
"""
)
