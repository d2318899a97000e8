"""The update rules as readable per-tensor code: documentation and test oracle.

Each function applies ONE step to ONE tensor, in the tensor's own dtype (run
it on float64 copies for an error baseline), with the same semantics as the
fused kernels (csrc/include/fused_optim/update_rules.h) and torch.optim's
single-tensor path. ``state`` is the torch.optim state dict of the param:
empty before its first step, when the rule makes it as torch.optim does
(but Adagrad's, which torch.optim makes at construction, from
``initial_accumulator_value``); ``step`` is incremented here. Nothing here
is fast, on purpose.
"""

from __future__ import annotations

import math

import torch

from fused_optim import _corrected_decay
from fused_optim._clip import check_max_grad_norm, clip_coefficient
from fused_optim._dtensor import is_dtensor
from fused_optim._keywords import check_lamb_arguments, check_tensor_lr


def _make_missing(state, param, *names, step=True) -> None:
    """What torch.optim makes in a param's state before its first step, where
    ``state`` lacks it: a 0-d step counter (unless ``step=False``) and zeros
    of the param's shape named ``names``."""
    if step and "step" not in state:
        state["step"] = torch.zeros((), dtype=_scalar_dtype())
    for name in names:
        if name not in state:
            state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)


def _decayed_grad(param, grad, weight_decay, maximize):
    grad = -grad if maximize else grad
    return grad + weight_decay * param if weight_decay != 0 else grad


def adam(param, grad, state, *, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay):
    beta1, beta2 = betas
    _make_missing(state, param, "exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ()))
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
    _make_missing(state, param, "square_avg", *(("grad_avg",) if centered else ()),
                  *(("momentum_buffer",) if momentum > 0 else ()))
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


def radam(param, grad, state, *, lr, betas, eps, weight_decay, maximize, decoupled_weight_decay):
    beta1, beta2 = betas
    _make_missing(state, param, "exp_avg", "exp_avg_sq")
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
    bias_correction2 = 1 - beta2**t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * beta2**t / bias_correction2
    update = m / (1 - beta1**t) * lr
    if rho_t > 5:  # the variance is tractable: rectify
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
        update = update * (bias_correction2**0.5 / (v.sqrt() + eps)) * rect
    param.sub_(update)


def nadam(param, grad, state, *, lr, betas, eps, weight_decay, momentum_decay, maximize,
          decoupled_weight_decay):
    beta1, beta2 = betas
    _make_missing(state, param, "exp_avg", "exp_avg_sq")
    state.setdefault("mu_product", torch.ones((), dtype=_scalar_dtype()))
    state["step"] += 1
    t = float(state["step"])
    if decoupled_weight_decay:
        grad = -grad if maximize else grad
        param.mul_(1 - lr * weight_decay)
    else:
        grad = _decayed_grad(param, grad, weight_decay, maximize)
    mu = beta1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = beta1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    # The per-param product of the schedule: a 0-d tensor (float32, as
    # torch's), multiplied in its own dtype.
    state["mu_product"] *= mu
    mu_product = float(state["mu_product"])
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = (v / (1 - beta2**t)).sqrt() + eps
    param.addcdiv_(grad, denom, value=-lr * (1 - mu) / (1 - mu_product))
    param.addcdiv_(m, denom, value=-lr * mu_next / (1 - mu_product * mu_next))


def decay_lr(lr, max_lr):
    """The lr a decoupled decay is scaled by: lr, or timm's corrected
    lr ** 2 / max_lr (max_lr not None)."""
    return lr if max_lr is None else lr**2 / max_lr


def corrected_max_lr(group, decoupled=True):
    """A group's max_lr for decay_lr: its snapshot when its decay is
    corrected, else None."""
    return group["max_lr_snapshot"] if decoupled and group["corrected_weight_decay"] else None


# Note [cautious groups]
# timm's Lion and Lamb take caution=True ("Cautious Optimizers", Liang et
# al. 2024, arXiv 2411.16085): the update's components whose sign differs
# from the gradient's are zeroed and the others scaled by the inverse of
# the fraction kept, so the update's mean size is kept:
#   mask = [u * g > 0],  u <- u * mask / max(mean(mask), 1e-3)
# (u the update before any decay, g the gradient as the step uses it:
# negated by maximize, clipped). The mean is over the whole tensor, a
# second per-tensor reduction before the update (and, in LAMB, before the
# update's norm), which the fused kernels do not make: a group with
# caution=True is stepped by this module's per-tensor code (the class's
# _torch_class; _torch_path.py), in the param's dtype as timm's is, with
# the state layout of the fused groups (the two can alternate on a param).
def cautious(update, grad):
    """``update`` with timm's cautious mask applied (in place; Note
    [cautious groups]), the mask and its mean in the gradient's dtype."""
    mask = (update * grad > 0).to(grad.dtype)
    mask.div_(mask.mean().clamp_(min=1e-3))
    return update.mul_(mask)


def lion(param, grad, state, *, lr, betas, weight_decay, maximize, max_lr=None, caution=False):
    # Chen et al. 2023, Algorithm 2 (decoupled decay), in lion-pytorch's op
    # order; with max_lr, timm's corrected decay; with caution, timm's
    # cautious mask and timm's op order (lerp: in fp16/bf16 the two orders
    # round differently, and caution is timm's option). No step counter:
    # the rule does not use one.
    beta1, beta2 = betas
    _make_missing(state, param, "exp_avg", step=False)
    grad = -grad if maximize else grad
    param.mul_(1 - decay_lr(lr, max_lr) * weight_decay)
    m = state["exp_avg"]
    if caution:
        update = cautious(m.lerp(grad, 1 - beta1).sign_(), grad)
    else:
        update = m.mul(beta1).add_(grad, alpha=1 - beta1).sign_()
    param.add_(update, alpha=-lr)
    if caution:
        m.lerp_(grad, 1 - beta2)
    else:
        m.mul_(beta2).add_(grad, alpha=1 - beta2)


class PerTensorReference(torch.optim.Optimizer):
    """The step of the reference classes (Lion, Lars, Lamb): the checks
    before anything changes (a group option the class refuses, sparse
    gradients), then, param by param in the param's own dtype, the class's
    rule on its state, complex params and their state as real views.
    A subclass gives ``_state_of(p, group)`` (the state dict the rule reads
    and extends, created as the package it mirrors creates it) and
    ``_rule(param, grad, state, lr, group)``; optionally ``_check_group``
    and ``_grad_coefficients`` (each group's gradient factor for a
    gradient dtype, None: as it is)."""

    # The step's global gradient norm (a 0-d tensor) when a caller computed
    # it over more groups than these: fused_optim's step, which hands its
    # unfused groups to this code (_torch_path.py). None: measured here.
    global_grad_norm = None

    def _check_group(self, group) -> None:
        pass

    def _grad_coefficients(self) -> list:
        """Each group's clipping factor for this step (None: not clipped),
        for the groups with a finite ``max_grad_norm``: a function of the
        gradient's dtype giving torch's clip_grad_norm_ coefficient
        ``min(1, max_grad_norm / (norm + 1e-6))``, computed as the fused
        step computes it (update_rules.h's clip_coefficient): the global L2
        norm of every gradient of every group (the caller's, else summed
        here in float64 and rounded as the fused step's, to a float32
        tensor, float64 if a gradient is, before the square root), then the
        factor in the element loops' compute dtype (float64 for float64
        gradients, else float32). A factor rounded otherwise (in float64,
        say) is as good, but differs from the kernel's by an ulp, which a
        moment that cancels (``beta1 * m + g``) magnifies."""
        clipped = [g.get("max_grad_norm") is not None and math.isfinite(g["max_grad_norm"])
                   for g in self.param_groups]
        if not any(clipped):
            return [None] * len(self.param_groups)
        norm = self.global_grad_norm
        if norm is None:
            sum_sq, wide = 0.0, False
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        grad = torch.view_as_real(p.grad) if p.grad.is_complex() else p.grad
                        wide = wide or grad.dtype == torch.float64
                        part = grad.double().square().sum()
                        # (a shard's sum is partial: the whole tensor's is all ranks')
                        sum_sq += float(part.full_tensor() if is_dtensor(part) else part)
            norm = torch.tensor(sum_sq, dtype=torch.float64 if wide else torch.float32).sqrt()
        def factor(max_norm: float):
            by_dtype = {}  # compute dtype -> this group's factor (made once a step)

            def of(grad_dtype):
                wide = grad_dtype in (torch.float64, torch.complex128)
                dtype = torch.float64 if wide else torch.float32
                if dtype not in by_dtype:
                    by_dtype[dtype] = clip_coefficient(norm.to(dtype), max_norm)
                return by_dtype[dtype]
            return of

        return [factor(group["max_grad_norm"]) if c else None
                for group, c in zip(self.param_groups, clipped)]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._check_group(group)
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        for group, coefficient in zip(self.param_groups, self._grad_coefficients()):
            lr = group["lr"]
            lr = lr.item() if isinstance(lr, torch.Tensor) else lr
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state_of(p, group)
                # (a copy when clipped: p.grad is not written)
                grad = p.grad if coefficient is None else p.grad * coefficient(p.grad.dtype)
                param, view = p, dict(state)
                if torch.is_complex(p):
                    param, grad = torch.view_as_real(p), torch.view_as_real(grad)
                    view = {k: torch.view_as_real(v) if torch.is_tensor(v) and v.is_complex() else v
                            for k, v in state.items()}
                before = dict(view)
                self._rule(param, grad, view, lr, group)
                for key, value in view.items():  # state the rule made or replaced
                    if before.get(key) is not value:
                        complex_state = torch.is_complex(p) and value.shape == param.shape
                        state[key] = torch.view_as_complex(value) if complex_state else value
        return loss


class Lion(PerTensorReference):
    """Lion as a plain torch.optim.Optimizer over :func:`lion`: the oracle of
    the tests (torch.optim has no Lion; tests/optim_configs.py's
    ``OptimConfig.torch_cls`` takes this class where torch has none). One
    tensor at a time, in the tensor's own dtype, state ``exp_avg`` as
    lion-pytorch's; complex params as real views, sparse gradients refused.
    Same signature as fused_optim.Lion without our precision keywords
    (``foreach``, timm's, is kept in the groups and changes nothing);
    ``caution=True`` is timm's cautious Lion (Note [cautious groups])."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, use_triton=False,
                 decoupled_weight_decay=False, *, maximize=False, corrected_weight_decay=False,
                 caution=False, foreach=None):
        # fused_optim.Lion's checks and messages (torch.optim's wording)
        check_tensor_lr(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        for i in (0, 1):
            if not 0.0 <= betas[i] <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if decoupled_weight_decay:
            _corrected_decay.check_initial_lr(lr)
        defaults = {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                    "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize,
                    "caution": caution, "foreach": foreach,
                    **_corrected_decay.defaults(lr, corrected_weight_decay)}
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        _corrected_decay.fill_in(self, keep_from_defaults=("decoupled_weight_decay",))
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("caution", False)  # (as timm's)
            group.setdefault("foreach", None)  # (as timm's)

    def _state_of(self, p, group) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _rule(self, param, grad, state, lr, group) -> None:
        # (lion-pytorch's decoupled_weight_decay: the decay divided by the
        # initial lr, as it divides it)
        weight_decay = group["weight_decay"]
        if group["decoupled_weight_decay"]:
            weight_decay = weight_decay / group["max_lr_snapshot"]
        lion(param, grad, state, lr=lr, betas=group["betas"], weight_decay=weight_decay,
             maximize=group["maximize"], max_lr=corrected_max_lr(group),
             caution=bool(group.get("caution")))


def tensor_norm(t) -> float:
    """A tensor's 2-norm as the fused step computes it (Note [per-tensor
    norms], hyperparams.h): the sum of squares accumulated in float64,
    stored in float32 unless the tensor is float64, its square root in
    float64. A DTensor's is the whole tensor's (its partial sums all-reduced).
    (Torch's ops, not the package's sum_of_squares, so that the tests of
    the fused norms compare two computations; a float64 dot product of the
    tensor with itself, one pass over one float64 copy where
    ``square().sum()`` makes two: the caution=True groups step through
    this code.)"""
    if is_dtensor(t):
        s = t.detach().double().square().sum().full_tensor()
    else:
        d = t.detach().double().reshape(-1)
        s = torch.dot(d, d)
    if t.dtype != torch.float64:
        s = s.float()
    return math.sqrt(float(s))


def lars_trust_ratio(param_norm, grad_norm, *, lr, weight_decay, trust_coeff, eps, trust_clip,
                     always_adapt) -> float:
    """timm's Lars trust ratio (timm/optim/lars.py), in float64: 1 for a
    group it does not adapt (weight_decay == 0 and not always_adapt) and
    where either norm is not positive; LARC's clipping after that."""
    if not (weight_decay != 0 or always_adapt):
        return 1.0
    if param_norm > 0 and grad_norm > 0:
        ratio = trust_coeff * param_norm / (grad_norm + param_norm * weight_decay + eps)
    else:
        ratio = 1.0
    if trust_clip:  # (timm's torch.clamp(ratio / lr, max=1.0), lr = 0 included)
        ratio = float(torch.clamp(torch.tensor(ratio, dtype=torch.float64) / lr, max=1.0))
    return ratio


def lars(param, grad, state, *, lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps,
         trust_clip, always_adapt, maximize):
    # timm's Lars, op by op: the trust ratio from the norms of the param and
    # of the gradient, (grad + wd * param) * ratio, then torch's SGD without
    # further decay. maximize (ours) negates the gradient first; no norm
    # sees the sign. No step counter: the rule does not use one.
    # (timm's `add` with alpha: a fused multiply-add, as the kernel's)
    ratio = lars_trust_ratio(tensor_norm(param), tensor_norm(grad), lr=lr,
                             weight_decay=weight_decay, trust_coeff=trust_coeff, eps=eps,
                             trust_clip=trust_clip, always_adapt=always_adapt)
    grad = -grad if maximize else grad
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    grad = grad.mul(ratio)
    if momentum != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = grad.clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        grad = grad.add(buf, alpha=momentum) if nesterov else buf
    param.add_(grad, alpha=-lr)


class Lars(PerTensorReference):
    """LARS as a plain torch.optim.Optimizer over :func:`lars`: the oracle of
    the tests, as :class:`Lion`. timm's ``Lars`` signature, checks and state
    (``momentum_buffer``; ``foreach`` kept in the groups, changing nothing),
    plus ``maximize`` (ours);
    one tensor at a time in its own dtype, complex params as real views,
    sparse gradients refused."""

    def __init__(self, params, lr=1.0, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False,
                 foreach=None, *, maximize=False):
        check_tensor_lr(lr)
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov, "trust_coeff": trust_coeff,
                    "eps": eps, "trust_clip": trust_clip, "always_adapt": always_adapt,
                    "maximize": maximize, "foreach": foreach}
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)  # (as timm's)

    def _state_of(self, p, group) -> dict:
        # (state only with momentum, as timm's: self.state[p] would create
        # an empty entry)
        return self.state[p] if group["momentum"] != 0 else {}

    def _rule(self, param, grad, state, lr, group) -> None:
        lars(param, grad, state, lr=lr, momentum=group["momentum"],
             dampening=group["dampening"], weight_decay=group["weight_decay"],
             nesterov=group["nesterov"], trust_coeff=group["trust_coeff"], eps=group["eps"],
             trust_clip=group["trust_clip"], always_adapt=group["always_adapt"],
             maximize=group["maximize"])


def lamb_trust_ratio(param_norm, update_norm, *, trust_clip) -> float:
    """LAMB's trust ratio ||p|| / ||u|| in float64: 1 where either norm is
    not positive (timm's nested torch.where), then LAMBC's clipping at 1."""
    ratio = param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
    return min(ratio, 1.0) if trust_clip else ratio


def lamb(param, grad, state, *, lr, betas, eps, weight_decay, bias_correction, grad_averaging,
         trust_clip, always_adapt, decoupled_decay, maximize, max_lr=None, caution=False):
    # You et al. 2020 ("Large Batch Optimization for Deep Learning: Training
    # BERT in 76 minutes", arXiv 1904.00962), Algorithm 2 with phi the
    # identity, and timm's options (timm/optim/lamb.py, 1.0.15 to 1.0.31) in timm's op
    # order:
    #   m = b1 m + b3 g    (b3 = 1 - b1, or 1 without grad_averaging)
    #   v = b2 v + (1 - b2) g^2
    #   u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)   (bc = 1 - b^t, or 1)
    #   u = cautious(u, g) with caution (Note [cautious groups])
    #   u += wd p, or p -= lr wd p first (decoupled_decay; with max_lr,
    #       timm's corrected decay: p -= lr^2 / max_lr wd p)
    #   r = ||p|| / ||u|| (1 if either is 0; min(r, 1) with trust_clip),
    #       only when wd != 0 or always_adapt, p being the decayed param
    #   p -= lr r u
    # maximize (ours) negates the gradient first. The step counter is the
    # param's own (timm keeps one per group: the same count whenever every
    # param has a gradient at every step). The global-norm clipping is done
    # by the caller (the class), on the gradient given here.
    beta1, beta2 = betas
    _make_missing(state, param, "exp_avg", "exp_avg_sq")
    state["step"] += 1
    t = float(state["step"])
    grad = -grad if maximize else grad
    beta3 = 1 - beta1 if grad_averaging else 1.0
    m, v = state["exp_avg"], state["exp_avg_sq"]
    if grad_averaging:
        m.lerp_(grad, beta3)  # (timm's op: rounds as timm's in fp16/bf16)
    else:
        m.mul_(beta1).add_(grad, alpha=beta3)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if bias_correction:
        bias_correction1, bias_correction2 = 1 - beta1**t, 1 - beta2**t
    else:
        bias_correction1, bias_correction2 = 1.0, 1.0
    denom = (v.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    update = (m / bias_correction1).div_(denom)
    if caution:
        cautious(update, grad)
    if weight_decay != 0:
        if decoupled_decay:
            # (before its norm is taken)
            param.add_(param, alpha=-decay_lr(lr, max_lr) * weight_decay)
        else:
            update.add_(param, alpha=weight_decay)
    if weight_decay != 0 or always_adapt:
        # (norms as the fused step's, tensor_norm; a zero weight_decay
        # without always_adapt leaves the update unscaled)
        update.mul_(lamb_trust_ratio(tensor_norm(param), tensor_norm(update),
                                     trust_clip=trust_clip))
    param.add_(update, alpha=-lr)


def _scalar_dtype():
    # torch.optim's step counter dtype: float32, float64 under a float64
    # default dtype
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class Lamb(PerTensorReference):
    """LAMB as a plain torch.optim.Optimizer over :func:`lamb`: the oracle of
    the tests, as :class:`Lion`. timm's ``Lamb`` signature and options, plus
    ``maximize`` (ours; ``foreach``, timm's, kept in the groups and changing
    nothing); torch.optim Adam's
    constructor checks; one tensor at a time in its own dtype, complex
    params as real views, sparse gradients refused before anything changes.

    Differences from timm, all shared with fused_optim.Lamb:

    - state per param ``step`` (a 0-d float32 tensor, as torch's Adam),
      ``exp_avg``, ``exp_avg_sq``; timm counts steps per group
      (``group["step"]``, an int). The counts agree whenever every param
      has a gradient at every step. state_dict/load_state_dict are
      torch.optim's own (fused_optim.Lamb's translate timm's group step);
    - clipping by the global L2 norm of every gradient of every group, each
      group clipped by its own ``max_grad_norm`` (None or inf: not clipped)
      with torch.nn.utils.clip_grad_norm_'s coefficient
      ``min(1, max_grad_norm / (norm + 1e-6))``; timm divides by
      ``max(1, norm / max_grad_norm)`` (no 1e-6) and takes the defaults'
      max_grad_norm for all groups. Both clip a copy: ``p.grad`` is left
      as it is.

    ``caution=True`` is timm's cautious LAMB (Note [cautious groups]).
    """

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6,
                 weight_decay=0.01, grad_averaging=True, max_grad_norm=1.0, trust_clip=False,
                 always_adapt=False, caution=False, decoupled_decay=False,
                 corrected_weight_decay=False, foreach=None, *, maximize=False):
        # timm's checks and messages, and torch.optim Adam's of betas
        check_lamb_arguments(lr, betas, eps, weight_decay)
        check_max_grad_norm(max_grad_norm)
        defaults = {"lr": lr, "bias_correction": bias_correction, "betas": betas, "eps": eps,
                    "weight_decay": weight_decay, "grad_averaging": grad_averaging,
                    "max_grad_norm": max_grad_norm, "trust_clip": trust_clip,
                    "always_adapt": always_adapt, "caution": caution,
                    "decoupled_decay": decoupled_decay, "maximize": maximize, "foreach": foreach,
                    **_corrected_decay.defaults(lr, corrected_weight_decay)}
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        _corrected_decay.fill_in(self)
        for group in self.param_groups:
            group.setdefault("caution", False)  # (as timm's)
            group.setdefault("decoupled_decay", False)  # (as timm's)
            group.setdefault("maximize", False)  # (timm's groups have none)
            group.setdefault("foreach", None)  # (as timm's)
            for p in group["params"]:
                # a float step (older torch checkpoints) as a tensor, as
                # torch.optim's Adam converts it
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(float(p_state["step"]), dtype=_scalar_dtype())

    def _state_of(self, p, group) -> dict:
        state = self.state[p]
        if "step" not in state:  # (of p: complex where p is)
            _make_missing(state, p, "exp_avg", "exp_avg_sq")
        return state

    def _rule(self, param, grad, state, lr, group) -> None:
        lamb(param, grad, state, lr=lr, betas=group["betas"], eps=group["eps"],
             weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
             grad_averaging=group["grad_averaging"], trust_clip=group["trust_clip"],
             always_adapt=group["always_adapt"], decoupled_decay=group["decoupled_decay"],
             maximize=group["maximize"],
             max_lr=corrected_max_lr(group, group["decoupled_decay"]),
             caution=bool(group.get("caution")))


# The oracle class of each optimizer that torch.optim lacks, by class name.
REFERENCE_CLASSES = {"Lion": Lion, "Lars": Lars, "Lamb": Lamb}
