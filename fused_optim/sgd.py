"""SGD: drop-in replacement for torch.optim.SGD."""

from __future__ import annotations

import torch
from torch.optim.sgd import sgd as _torch_sgd

from fused_optim import _docs
from fused_optim._base import FusedOptimizer
from fused_optim._clip import check_max_grad_norm
from fused_optim._momentum import MomentumBufferState
from fused_optim._keywords import check_implementation_keywords, check_tensor_lr, to_float
from fused_optim._precision import check_precision_keywords

__all__ = ["SGD"]


class SGD(MomentumBufferState, FusedOptimizer):
    _op_name = "sgd_"
    _torch_class = torch.optim.SGD
    _supports_sparse = True

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        max_grad_norm: float | None = None,
    ) -> None:
        # Same checks, order and messages as torch.optim.SGD.
        check_tensor_lr(lr)
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        precision = check_precision_keywords(master_weights, state_dtype, stochastic_rounding)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
            **precision,
            "max_grad_norm": check_max_grad_norm(max_grad_norm),
        }
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_implementation_keywords(
            "SGD", foreach=foreach, fused=fused, differentiable=differentiable, precision=precision
        )
        super().__init__(params, defaults)

    _setstate_defaults = {
        "nesterov": False, "maximize": False, "foreach": None, "differentiable": False,
        "fused": None,  # (torch: False; None is our fused step)
    }

    _hyperparameters_are_group_options = True

    def _check_sparse(self, group, param, grad, is_new: bool) -> None:
        # torch.optim fails in each case too, but only after updating the
        # params before this one (and, but for weight decay, this param's
        # momentum buffer).
        if group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")
        if group["momentum"] == 0 or is_new:
            return
        buffer = self.state.get(param, {}).get("momentum_buffer")  # (makes no state)
        if buffer is None:
            return
        if buffer.is_sparse and buffer.sparse_dim() != grad.sparse_dim():
            raise RuntimeError(
                f"fused_optim.SGD: a sparse gradient with {grad.sparse_dim()} sparse dims for a "
                f"param whose sparse momentum buffer has {buffer.sparse_dim()}: torch.optim "
                "raises here too (add: expected 'self' and 'other' to have same density)")
        if group["nesterov"] and not buffer.is_sparse:
            raise RuntimeError(
                "fused_optim.SGD: nesterov momentum with a sparse gradient for a param whose "
                "momentum buffer is dense (made by a dense gradient): torch.optim raises here "
                "too (add(sparse, dense) is not supported)")

    def _sparse_step(self, group, params, grads, is_new) -> None:
        # Sparse gradients go through torch.optim's own single-tensor SGD:
        # a sparse update touches few rows, so there is nothing to fuse.
        uses_momentum = group["momentum"] != 0
        buffers = [
            None if (new or not uses_momentum) else self.state[p]["momentum_buffer"]
            for p, new in zip(params, is_new)
        ]
        _torch_sgd(
            params,
            grads,
            buffers,
            has_sparse_grad=True,
            foreach=False,
            weight_decay=to_float(group["weight_decay"]),
            momentum=group["momentum"],
            lr=to_float(group["lr"]),
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
        )
        if uses_momentum:
            for p, buffer in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buffer


SGD.__doc__ = (
    r"""Stochastic gradient descent with momentum, fused: drop-in for
    :class:`torch.optim.SGD`.

    .. math::
       \begin{aligned}
            &g_t \leftarrow \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\theta_{t-1}
                \quad (-\text{ if } \textit{maximize}) \\
            &\textbf{if } \mu \neq 0: \quad
                b_t \leftarrow \begin{cases} g_t & t = 1 \\
                    \mu b_{t-1} + (1-\tau) g_t & t > 1 \end{cases}, \quad
                g_t \leftarrow \begin{cases} g_t + \mu b_t & \textit{nesterov} \\
                    b_t & \text{otherwise} \end{cases} \\
            &\theta_t \leftarrow \theta_{t-1} - \gamma g_t
       \end{aligned}

    Symbols: :math:`\gamma` ``lr``, :math:`\mu` ``momentum``, :math:`\tau`
    ``dampening``, :math:`\lambda` ``weight_decay``; state :math:`b`
    ``momentum_buffer`` (only when momentum is non-zero; SGD keeps no
    ``step``).

    Conventions: as torch.optim (and unlike Sutskever et al.), the learning
    rate multiplies the buffer rather than being folded into it, so changing
    ``lr`` mid-run does not rescale past momentum; the first step sets the
    buffer to the gradient, undamped.

    Args:
        """
    + _docs.PARAMS
    + r"""
        lr (float, Tensor, optional): learning rate :math:`\gamma` (default: 1e-3).
        momentum (float, optional): :math:`\mu` (default: 0).
        dampening (float, optional): :math:`\tau` (default: 0).
        weight_decay (float, optional): :math:`\lambda`, L2 penalty (default: 0).
        nesterov (bool, optional): Nesterov momentum (default: False).
        """
    + _docs.MAXIMIZE
    + "\n        "
    + _docs.implementation("foreach", "differentiable", "fused")
    + "\n        "
    + _docs.PRECISION
    + """

    With ``stochastic_rounding`` SGD keeps a ``state["step"]`` counter
    (torch.optim.SGD has none): it draws the rounding's random bits.
"""
    + r"""

    Sparse gradients are supported as in torch.optim (through its
    single-tensor implementation, unfused).
"""
    + _docs.FUSED_NOTE.format(op="sgd_")
    + """
    References: Sutskever et al., "On the importance of initialization and
    momentum in deep learning", ICML 2013.
"""
)
