"""The update rules as readable per-tensor code: documentation and test oracle.

Each function applies ONE step to ONE tensor, in the tensor's own dtype (run
it on float64 copies for an error baseline), with the same semantics as the
fused kernels (csrc/include/fused_optim/update_rules.h) and torch.optim's
single-tensor path. ``state`` is the torch.optim state dict of the param;
``step`` is incremented here. Nothing here is fast, on purpose.
"""

from __future__ import annotations

import torch


def _decayed_grad(param, grad, weight_decay, maximize):
    grad = -grad if maximize else grad
    return grad + weight_decay * param if weight_decay != 0 else grad


def adam(param, grad, state, *, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
    beta1, beta2 = betas
    state["step"] += 1
    t = float(state["step"])
    if decoupled_weight_decay:
        grad = -grad if maximize else grad
        param.mul_(1 - lr * weight_decay)
    else:
        grad = _decayed_grad(param, grad, weight_decay, maximize)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if amsgrad:
        torch.maximum(state["max_exp_avg_sq"], v, out=state["max_exp_avg_sq"])
        v = state["max_exp_avg_sq"]
    step_size = lr / (1 - beta1**t)
    denom = v.sqrt() / (1 - beta2**t) ** 0.5 + eps
    param.addcdiv_(m, denom, value=-step_size)


def sgd(param, grad, state, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    grad = _decayed_grad(param, grad, weight_decay, maximize)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad + momentum * buf if nesterov else buf
    param.add_(grad, alpha=-lr)


def adagrad(param, grad, state, *, lr, lr_decay, weight_decay, eps, maximize):
    state["step"] += 1
    t = float(state["step"])
    grad = _decayed_grad(param, grad, weight_decay, maximize)
    clr = lr / (1 + (t - 1) * lr_decay)
    state["sum"].addcmul_(grad, grad, value=1)
    param.addcdiv_(grad, state["sum"].sqrt() + eps, value=-clr)


def rmsprop(param, grad, state, *, lr, alpha, eps, weight_decay, momentum, centered, maximize):
    state["step"] += 1
    grad = _decayed_grad(param, grad, weight_decay, maximize)
    square_avg = state["square_avg"]
    square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
    if centered:
        grad_avg = state["grad_avg"]
        grad_avg.lerp_(grad, 1 - alpha)
        avg = (square_avg - grad_avg * grad_avg).sqrt() + eps
    else:
        avg = square_avg.sqrt() + eps
    if momentum > 0:
        buf = state["momentum_buffer"]
        buf.mul_(momentum).addcdiv_(grad, avg)
        param.add_(buf, alpha=-lr)
    else:
        param.addcdiv_(grad, avg, value=-lr)
