"""Lion (Chen et al., 2023): the EvoLved Sign Momentum optimizer, fused."""

from __future__ import annotations

import operator

import torch

from fused_optim import _corrected_decay, _docs, _reference
from fused_optim._base import FusedOptimizer
from fused_optim._clip import check_max_grad_norm
from fused_optim._keywords import check_implementation_keywords, check_tensor_lr, to_float
from fused_optim._precision import check_precision_keywords

__all__ = ["Lion"]

_op_max_lr = _corrected_decay.op_max_lr
_op_weight_decay = _corrected_decay.lion_weight_decay


class Lion(FusedOptimizer):
    _op_name = "lion_"
    # torch.optim has no Lion; no keyword of ours selects a torch path, so
    # this is only what the other classes' attribute says: the plain
    # implementation of the same rule (the tests' oracle).
    _torch_class = _reference.Lion
    # lion-pytorch keeps no step counter; ours keeps one only with
    # stochastic rounding (see _keeps_step), as SGD.
    _has_step = False
    _takes_caution = True  # (timm's; Note [cautious groups] in _reference.py)

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        use_triton: bool = False,
        decoupled_weight_decay: bool = False,
        *,
        maximize: bool = False,
        corrected_weight_decay: bool = False,
        caution: bool = False,
        foreach: bool | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        # torch.optim's checks and messages (lion-pytorch asserts lr > 0 and
        # 0 <= beta <= 1; a zero lr is legal here, as in torch.optim).
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= betas[0] <= 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] <= 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if decoupled_weight_decay:
            _corrected_decay.check_initial_lr(lr)
        # (use_triton: lion-pytorch's choice of its Triton kernel; ours is
        # the fused step whatever it says, as foreach=True is elsewhere)
        precision = check_precision_keywords(master_weights, state_dtype, stochastic_rounding)
        check_implementation_keywords(
            "Lion", foreach=foreach, fused=None, differentiable=False, precision=precision,
            caution=caution,
        )
        defaults = {
            "lr": lr,
            "betas": betas,
            "weight_decay": weight_decay,
            "decoupled_weight_decay": decoupled_weight_decay,
            "maximize": maximize,
            "caution": caution,
            "foreach": foreach,
            **precision,
            "max_grad_norm": check_max_grad_norm(max_grad_norm),
            **_corrected_decay.defaults(lr, corrected_weight_decay),
        }
        super().__init__(params, defaults)

    # (lion-pytorch's groups have no maximize, nor caution; foreach as timm's)
    _setstate_defaults = {"maximize": False, "caution": False, "foreach": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        _corrected_decay.fill_in(self, keep_from_defaults=("decoupled_weight_decay",))

    def _state_names(self, mode) -> tuple:
        return ("exp_avg",)

    def _keeps_step(self, group) -> bool:
        # The update uses no step. With stochastic rounding we keep one (our
        # own state, saved under "step"): the rounding's random bits are
        # drawn by it, so they change from step to step.
        return bool(group.get("stochastic_rounding"))

    def _hyperparameter_lists(self, groups) -> list:
        beta1, beta2 = zip(*map(operator.itemgetter("betas"), groups))
        return [list(map(float, beta1)), list(map(float, beta2)),
                list(map(_op_weight_decay, groups)), list(map(_op_max_lr, groups))]

    def _hyperparameters(self, group) -> dict:
        beta1, beta2 = group["betas"]
        return {
            "beta1": to_float(beta1),
            "beta2": to_float(beta2),
            "weight_decay": _op_weight_decay(group),
            "max_lr": _op_max_lr(group),
        }


Lion.__doc__ = (
    r"""Lion (Chen et al., 2023), fused. torch.optim has no Lion; signature,
    state and update as lion-pytorch's ``Lion`` (version 0.2.5), so
    checkpoints move between the two.

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (-\text{ if } \textit{maximize}) \\
            &\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma_d\lambda_d), \quad
                \gamma_d = \gamma^2/\gamma_{\max} \text{ if }
                \textit{corrected\_weight\_decay} \text{ else } \gamma, \quad
                \lambda_d = \lambda/\gamma_{\max} \text{ if }
                \textit{decoupled\_weight\_decay} \text{ else } \lambda \\
            &c_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
            &u_t \leftarrow \mathrm{sign}(c_t), \quad
                u_t \leftarrow u_t \odot \mathbb{1}[u_t \odot g_t > 0] /
                \max(\mathrm{mean}(\mathbb{1}[u_t \odot g_t > 0]), 10^{-3})
                \quad (\textit{caution} \text{ only}) \\
            &\theta_t \leftarrow \theta_{t-1} - \gamma u_t \\
            &m_t \leftarrow \beta_2 m_{t-1} + (1-\beta_2) g_t
       \end{aligned}

    Symbols: :math:`\gamma` ``lr``, :math:`\beta_1, \beta_2` ``betas``,
    :math:`\lambda` ``weight_decay``, :math:`\gamma_{\max}` the group's
    ``max_lr_snapshot`` (the constructor's lr); state :math:`m` ``exp_avg``.

    Conventions: the weight decay is decoupled and scaled by the learning
    rate, as in the paper's Algorithm 2 and lion-pytorch; lion-pytorch's
    ``decoupled_weight_decay=True`` also divides it by the initial lr (the
    constructor's, which must then be positive; ours keeps it and the flag
    in each group, lion-pytorch on the optimizer: a checkpoint of either
    loads with the loader's flag where it has none). ``use_triton`` is
    accepted and changes nothing: the step is our fused one.
    :math:`\mathrm{sign}(0) = 0`, as ``torch.sign``.
    State: ``exp_avg`` only, as lion-pytorch; a ``step`` counter is kept
    only with ``stochastic_rounding`` (its random bits change with it), as
    our SGD does; a lion-pytorch checkpoint without it loads and starts one.
    ``maximize`` is ours (lion-pytorch has none). No ``fused``,
    ``capturable`` or ``differentiable`` keyword: there is no torch.optim
    implementation to select. ``corrected_weight_decay``, ``caution`` and
    ``foreach`` are timm's (its ``Lion``; lion-pytorch has none of them),
    with timm's group options and checkpoints; they are keyword-only here,
    timm's positions being lion-pytorch's ``use_triton`` and
    ``decoupled_weight_decay``. ``foreach`` (timm's choice between its
    single-tensor and multi-tensor code) changes nothing: the step is our
    fused one either way.

    Args:
        """
    + _docs.PARAMS
    + r"""
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-4).
        betas (tuple[float, float], optional): :math:`(\beta_1, \beta_2)`,
            the interpolation of the update direction and the decay rate of
            the momentum (default: (0.9, 0.99)).
        weight_decay (float, optional): :math:`\lambda`, decoupled
            (default: 0.0).
        use_triton (bool, optional): lion-pytorch's; accepted, no effect
            (default: False).
        decoupled_weight_decay (bool, optional): lion-pytorch's: divide
            :math:`\lambda` by the constructor's lr :math:`\gamma_{\max}`
            (default: False).
        corrected_weight_decay (bool, optional): scale the decay by
            :math:`\gamma^2/\gamma_{\max}` instead of :math:`\gamma`
            (timm's; the constructor's lr, which must then be positive, is
            :math:`\gamma_{\max}`) (default: False).
        """
    + _docs.CAUTION
    + "\n        "
    + _docs.MAXIMIZE
    + "\n        "
    + _docs.PRECISION
    + "\n"
    + _docs.FUSED_NOTE.format(op="lion_")
    + """
    References: Chen et al., "Symbolic Discovery of Optimization
    Algorithms", NeurIPS 2023, https://arxiv.org/abs/2302.06675;
    lion-pytorch, https://github.com/lucidrains/lion-pytorch.
"""
)
