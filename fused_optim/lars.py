"""LARS (You, Gitman, Ginsburg 2017): layer-wise adaptive rate scaling, fused."""

from __future__ import annotations

import torch

from fused_optim import _docs, _reference
from fused_optim._base import FusedOptimizer
from fused_optim._clip import check_max_grad_norm
from fused_optim._momentum import MomentumBufferState
from fused_optim._keywords import check_implementation_keywords, check_tensor_lr
from fused_optim._precision import check_precision_keywords

__all__ = ["Lars"]


class Lars(MomentumBufferState, FusedOptimizer):
    _op_name = "lars_"
    # torch.optim has no LARS: the plain implementation of the same rule (the
    # tests' oracle), as Lion's.
    _torch_class = _reference.Lars
    # timm's Lars keeps no step counter; ours keeps one only with stochastic
    # rounding (see _keeps_step), as SGD.

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1.0,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        trust_coeff: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        always_adapt: bool = False,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        # timm's checks, order and messages (torch.optim's wording), after
        # the tensor-lr check every class of ours makes.
        check_tensor_lr(lr)
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        precision = check_precision_keywords(master_weights, state_dtype, stochastic_rounding)
        check_implementation_keywords(
            "Lars", foreach=foreach, fused=None, differentiable=False, precision=precision
        )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "trust_coeff": trust_coeff,
            "eps": eps,
            "trust_clip": trust_clip,
            "always_adapt": always_adapt,
            "maximize": maximize,
            "foreach": foreach,
            **precision,
            "max_grad_norm": check_max_grad_norm(max_grad_norm),
        }
        super().__init__(params, defaults)

    # (nesterov and foreach as timm's; timm's groups have no maximize)
    _setstate_defaults = {"nesterov": False, "maximize": False, "foreach": None}

    # (trust_clip and always_adapt, per-group bools, reach the op's float
    # lists as 0.0 or 1.0)
    _hyperparameters_are_group_options = True


Lars.__doc__ = (
    r"""LARS (You, Gitman, Ginsburg 2017), fused. torch.optim has no LARS; the
    options, update and state are timm's ``Lars`` (``timm/optim/lars.py``,
    timm 0.9 to 1.0: LARS with apex's LARC clipping), so checkpoints move
    between the two.

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1})
                \quad (-\text{ if } \textit{maximize}) \\
            &\textbf{if } \lambda \neq 0 \textbf{ or } \textit{always\_adapt}: \\
            &\quad r_t \leftarrow \begin{cases}
                \dfrac{\eta\,\lVert\theta_{t-1}\rVert}
                      {\lVert g_t\rVert + \lambda\lVert\theta_{t-1}\rVert + \epsilon}
                    & \lVert\theta_{t-1}\rVert > 0,\ \lVert g_t\rVert > 0 \\
                1 & \text{otherwise} \end{cases}, \quad
                r_t \leftarrow \min(r_t / \gamma, 1) \text{ if } \textit{trust\_clip} \\
            &\quad g_t \leftarrow (g_t + \lambda\theta_{t-1})\, r_t \\
            &\textbf{if } \mu \neq 0: \quad
                b_t \leftarrow \begin{cases} g_t & t = 1 \\
                    \mu b_{t-1} + (1-\tau) g_t & t > 1 \end{cases}, \quad
                g_t \leftarrow \begin{cases} g_t + \mu b_t & \textit{nesterov} \\
                    b_t & \text{otherwise} \end{cases} \\
            &\theta_t \leftarrow \theta_{t-1} - \gamma g_t
       \end{aligned}

    Symbols: :math:`\gamma` ``lr``, :math:`\mu` ``momentum``, :math:`\tau`
    ``dampening``, :math:`\lambda` ``weight_decay``, :math:`\eta`
    ``trust_coeff``, :math:`\epsilon` ``eps``; state :math:`b`
    ``momentum_buffer`` (only when momentum is non-zero).

    Conventions: as timm, the trust ratio is applied only to groups with a
    non-zero ``weight_decay`` or ``always_adapt=True`` (exclude biases and
    norms from adaptation with a group of ``weight_decay=0``), and
    ``trust_clip`` (LARC's clipping) clamps :math:`r_t/\gamma` after the
    zero-norm rule. The norms are of each param (its float32 master copy with
    ``master_weights``) and of the gradient the step uses: unscaled under
    AMP, after ``max_grad_norm`` clipping and before ``maximize``'s sign
    (which no norm sees). They are computed for all tensors of a step in one
    reduction pass (sums of squares accumulated in float64, stored in float32
    unless a param is float64). A zero ``weight_decay`` adds no
    :math:`0\cdot\theta` term (timm adds one, which is NaN only for an
    infinite param). ``maximize`` is ours (timm has none). ``foreach`` is
    timm's choice between its single-tensor and multi-tensor code: accepted
    and kept in the groups as timm's; ours is the fused step either way.
    No ``fused`` or ``differentiable`` keyword: there is no torch.optim
    implementation to select. Sparse gradients are refused. On sharded
    DTensors (FSDP2, tensor parallelism) the sums of squares of the shards
    are all-reduced over the mesh before the update, so the norms are those
    of the whole tensors (Note [norms across shards]).

    Args:
        """
    + _docs.PARAMS
    + r"""
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1.0).
        momentum (float, optional): :math:`\mu` (default: 0).
        dampening (float, optional): :math:`\tau` (default: 0).
        weight_decay (float, optional): :math:`\lambda`, L2 penalty inside the
            trust ratio (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        trust_coeff (float, optional): :math:`\eta` (default: 0.001).
        eps (float, optional): :math:`\epsilon` (default: 1e-8).
        trust_clip (bool, optional): LARC clipping of the ratio (default: False).
        always_adapt (bool, optional): apply the ratio even with a zero
            weight decay (default: False).
        """
    + _docs.MAXIMIZE
    + "\n        "
    + _docs.PRECISION
    + """

    With ``stochastic_rounding`` Lars keeps a ``state["step"]`` counter
    (timm's has none): it draws the rounding's random bits.
"""
    + _docs.FUSED_NOTE.format(op="lars_")
    + """
    References: You, Gitman, Ginsburg, "Large Batch Training of
    Convolutional Networks", 2017, https://arxiv.org/abs/1708.03888; timm,
    https://github.com/huggingface/pytorch-image-models
    (timm/optim/lars.py).
"""
)
