"""Adam and AdamW: drop-in replacements for torch.optim.Adam / AdamW."""

from __future__ import annotations

import operator

import torch

from fused_optim import _docs
from fused_optim._base import FusedOptimizer
from fused_optim._clip import check_max_grad_norm
from fused_optim._keywords import check_adam_arguments, check_implementation_keywords, to_float
from fused_optim._precision import check_precision_keywords

__all__ = ["Adam", "AdamW"]

_BETAS_EPS_WD = operator.itemgetter("betas", "eps", "weight_decay")


class Adam(FusedOptimizer):
    _op_name = "adam_"
    _torch_class = torch.optim.Adam
    # (AdamW's too: torch.optim.AdamW raises Adam's message)
    _sparse_gradient_error = "Adam does not support sparse gradients, please consider SparseAdam instead"
    _fused_differentiable_error = "Adam with fused=True does not support differentiable=True"

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        # Same checks, order and messages as torch.optim.Adam.
        check_adam_arguments(lr, betas, eps, weight_decay)
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if foreach and not capturable:
            # torch's foreach code reads no tensor lr or betas, so torch
            # refuses them with foreach=True. So do we, although foreach=True
            # with fused=None is our fused step, which reads them: code that
            # passes them is then code torch.optim refuses (Note
            # [implementation keywords]). torch checks this before refusing
            # fused=True with foreach=True (below).
            for value, name in ((lr, "lr"), (betas[0], "betas[0]"), (betas[1], "betas[1]")):
                if isinstance(value, torch.Tensor):
                    raise ValueError(
                        f"{name} as a Tensor is not supported for capturable=False and foreach=True"
                    )
        precision = check_precision_keywords(master_weights, state_dtype, stochastic_rounding)
        check_implementation_keywords(
            type(self).__name__,
            foreach=foreach,
            fused=fused,
            differentiable=differentiable,
            precision=precision,
        )
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
            **precision,
            "max_grad_norm": check_max_grad_norm(max_grad_norm),
        }
        super().__init__(params, defaults)

    _setstate_defaults = {
        "amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
        "differentiable": False, "decoupled_weight_decay": False, "fused": None,
    }

    _mode_keys = ("amsgrad",)

    def _mode(self, group) -> tuple:
        return (bool(group["amsgrad"]),)

    def _op_modes(self, mode) -> dict:
        return {"amsgrad": mode[0]}

    def _state_names(self, mode) -> tuple:
        amsgrad = mode[0]
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())

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


class AdamW(Adam):
    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            master_weights=master_weights,
            state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding,
            max_grad_norm=max_grad_norm,
        )

    def __setstate__(self, state):
        super().__setstate__(state)
        # As torch.optim.AdamW: loading any state keeps the decay decoupled.
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


_ADAM_MATH = r"""
    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (-\text{ if } \textit{maximize}) \\
            &\textbf{if } \textit{decoupled}: \theta_{t-1} \leftarrow
                \theta_{t-1}(1 - \gamma\lambda)
             \quad \textbf{else}: g_t \leftarrow g_t + \lambda\theta_{t-1} \\
            &m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
            &v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
            &\textbf{if } \textit{amsgrad}: \hat v_t \leftarrow
                \max(\hat v_{t-1}, v_t) \quad \textbf{else}: \hat v_t \leftarrow v_t \\
            &\theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
                \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}
       \end{aligned}

    Symbols: :math:`\gamma` ``lr``, :math:`\beta_1, \beta_2` ``betas``,
    :math:`\epsilon` ``eps``, :math:`\lambda` ``weight_decay``; state
    :math:`m` ``exp_avg``, :math:`v` ``exp_avg_sq``, :math:`\hat v`
    ``max_exp_avg_sq`` (amsgrad only), :math:`t` ``step``.

    Conventions: :math:`\epsilon` is added to the bias-corrected
    :math:`\sqrt{\hat v_t}`, as in torch.optim and the paper's Algorithm 1
    (not to the uncorrected :math:`\sqrt{v_t}`, as in the paper's
    "efficient" form and in optax's ``eps_root``-free default). With
    amsgrad the maximum is taken over the uncorrected :math:`v_t`, as in
    torch.optim.
"""

_ARGS = rf"""
    Args:
        {_docs.PARAMS}
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-3).
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)`,
            decay rates of the first and second moment averages
            (default: (0.9, 0.999)).
        eps (float, optional): :math:`\epsilon`, added to the denominator for
            numerical stability (default: 1e-8).
        weight_decay (float, optional): :math:`\lambda` (default: {{wd}}).
        amsgrad (bool, optional): use the AMSGrad variant (default: False).
        {_docs.MAXIMIZE}
        {_docs.implementation("foreach", "capturable", "differentiable", "fused")}
        {_docs.PRECISION}
"""

Adam.__doc__ = (
    r"""Adam (Kingma & Ba, 2015), fused: drop-in for :class:`torch.optim.Adam`.
"""
    + _ADAM_MATH
    + _ARGS.replace("{wd}", "0")
    + r"""        decoupled_weight_decay (bool, optional): decay the params directly
            (AdamW) instead of adding :math:`\lambda\theta` to the gradient
            (default: False).
"""
    + _docs.FUSED_NOTE.format(op="adam_")
    + """
    References: Kingma & Ba, "Adam: A Method for Stochastic Optimization",
    ICLR 2015, https://arxiv.org/abs/1412.6980; Reddi et al., "On the
    Convergence of Adam and Beyond", ICLR 2018 (AMSGrad).
"""
)

AdamW.__doc__ = (
    r"""AdamW (Loshchilov & Hutter, 2019), fused: drop-in for :class:`torch.optim.AdamW`.

    Adam with decoupled weight decay: the params shrink by
    :math:`(1 - \gamma\lambda)` each step instead of :math:`\lambda\theta`
    being added to the gradient (so the decay does not pass through the
    adaptive scaling).
"""
    + _ADAM_MATH
    + _ARGS.replace("{wd}", "1e-2")
    + _docs.FUSED_NOTE.format(op="adam_")
    + """
    Conventions: the decay is scaled by the learning rate (torch.optim's
    convention), not applied as the paper's schedule-multiplier-only
    :math:`\\eta_t\\lambda`.

    References: Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019, https://arxiv.org/abs/1711.05101.
"""
)
