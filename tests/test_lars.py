"""Lars (LARS), which torch.optim lacks: against its float64 reference rule
(fused_optim._reference.lars, timm's Lars op by op), against timm's Lars
itself where timm is installed, and the per-tensor norm channel (Note
[per-tensor norms] in csrc/include/fused_optim/hyperparams.h): one reduction
pass per op call, the norms of unscaled (AMP) and clipped gradients, zero
norms giving a ratio of 1.

The table-driven suites cover Lars through its reference class
(optim_configs.torch_class); these tests add the rule in float64 over vector
bodies and tails, several groups with different trust settings, and the
package Lars users come from."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fused_optim
from fused_optim import _reference

from harness import seeded_grads, timm_optimizer, trust_ratio_params, unscaling_in_step

SIZES = [1, 7, 33, 4099, 5]
STEPS = 12

# Groups with different trust settings: adapted with decay; adapted with
# LARC clipping; not adapted (weight_decay 0: plain SGD); always_adapt
# without decay, Nesterov. The last tensor of each group is all zeros
# (its param norm is 0: ratio 1).
GROUPS = [
    dict(lr=0.5, momentum=0.9, weight_decay=0.01, trust_coeff=0.02),
    dict(lr=0.8, momentum=0.5, dampening=0.2, weight_decay=0.001, trust_clip=True, eps=1e-6),
    dict(lr=0.05, momentum=0.9),
    dict(lr=1.0, momentum=0.8, nesterov=True, always_adapt=True, trust_coeff=0.01, maximize=True),
]
DEFAULTS = dict(lr=1.0, momentum=0, dampening=0, weight_decay=0, nesterov=False, trust_coeff=0.001,
                eps=1e-8, trust_clip=False, always_adapt=False, maximize=False)


def _params(dtype, seed=0):
    return trust_ratio_params(dtype, len(GROUPS), SIZES, None, seed)


def _grads(step, dtype, params):
    return seeded_grads(step, dtype, params)


def _groups(params):
    n = len(SIZES)
    return [dict(params=params[k * n:(k + 1) * n], **GROUPS[k]) for k in range(len(GROUPS))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_float64_reference(dtype):
    # Ours in `dtype` against the reference rule in float64 from the same
    # start, after every step, on params and momentum buffers.
    params = _params(dtype)
    ref = [p.detach().double().clone() for p in params]
    ref_state = [{} for _ in ref]
    opt = fused_optim.Lars(_groups(params))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    n = len(SIZES)
    for step in range(STEPS):
        grads = _grads(step, dtype, params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, (r, st, g) in enumerate(zip(ref, ref_state, grads)):
            _reference.lars(r, g.double(), st, **{**DEFAULTS, **GROUPS[i // n]})
        for p, r, st in zip(params, ref, ref_state):
            assert p.dtype == dtype
            torch.testing.assert_close(p.detach().double(), r, **tol)
            buf = opt.state[p]["momentum_buffer"]
            assert buf.dtype == dtype and set(opt.state[p]) == {"momentum_buffer"}
            torch.testing.assert_close(buf.double(), st["momentum_buffer"], **tol)


def test_zero_param_and_zero_grad_take_ratio_one():
    # ||p|| = 0 or ||g|| = 0: ratio 1, so the step is plain SGD with decay.
    p = torch.nn.Parameter(torch.zeros(5))
    q = torch.nn.Parameter(torch.ones(5))
    p.grad = torch.full((5,), 2.0)
    q.grad = torch.zeros(5)
    fused_optim.Lars([p, q], lr=0.1, weight_decay=0.5, trust_coeff=0.001).step()
    assert p.tolist() == pytest.approx([-0.2] * 5)  # p - lr * (g + wd * 0) * 1
    assert q.tolist() == pytest.approx([1 - 0.1 * 0.5] * 5)  # q - lr * wd * q * 1


def test_ratio_is_the_papers():
    # One step without momentum, written out: the trust ratio scales the
    # decayed gradient; trust_clip takes min(ratio / lr, 1).
    torch.manual_seed(0)
    p0, g = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    for clip in (False, True):
        for lr in (0.01, 10.0):
            p = torch.nn.Parameter(p0.clone())
            p.grad = g.clone()
            fused_optim.Lars([p], lr=lr, weight_decay=0.1, trust_coeff=0.05, trust_clip=clip).step()
            ratio = 0.05 * p0.norm() / (g.norm() + 0.1 * p0.norm() + 1e-8)
            if clip:
                ratio = min(ratio / lr, 1.0)
            torch.testing.assert_close(p.detach(), p0 - lr * ratio * (g + 0.1 * p0))


def test_group_without_decay_is_not_adapted_unless_always_adapt():
    torch.manual_seed(0)
    p0, g = torch.randn(50), torch.randn(50)
    plain = torch.nn.Parameter(p0.clone())
    plain.grad = g.clone()
    fused_optim.Lars([plain], lr=0.1).step()
    torch.testing.assert_close(plain.detach(), p0 - 0.1 * g)
    adapted = torch.nn.Parameter(p0.clone())
    adapted.grad = g.clone()
    fused_optim.Lars([adapted], lr=0.1, always_adapt=True).step()
    ratio = 0.001 * p0.double().norm() / (g.double().norm() + 1e-8)
    torch.testing.assert_close(adapted.detach().double(), p0.double() - 0.1 * ratio * g.double())


def _sum_of_squares_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()].count("fused_optim::sum_of_squares")


@pytest.mark.parametrize("nesterov_groups", [0, 1])
def test_norms_of_all_tensors_in_one_pass(nesterov_groups):
    # The four groups in one op call (one mode) or two (Nesterov in one
    # group: two modes): one sum_of_squares per op call, over every param
    # and grad of the call, not one per tensor.
    params = _params(torch.float32)
    groups = [dict(g, momentum=0.9, nesterov=k < nesterov_groups, dampening=0.0)
              for k, g in enumerate(_groups(params))]
    opt = fused_optim.Lars(groups)
    for p, g in zip(params, _grads(0, torch.float32, params)):
        p.grad = g
    opt.step()  # (plans and state on the first step)
    for p, g in zip(params, _grads(1, torch.float32, params)):
        p.grad = g
    assert _sum_of_squares_calls(opt.step) == 1 + nesterov_groups


def test_norm_is_of_the_clipped_gradient():
    # max_grad_norm clips the gradient before the update rule: the ratio's
    # gradient norm is the clipped gradient's, so the step equals the
    # reference stepped on the clipped gradient.
    torch.manual_seed(0)
    p0 = [torch.randn(n, dtype=torch.float64) for n in (7, 33, 4099)]
    grads = [torch.randn_like(t) * 10 for t in p0]
    total = math.sqrt(sum(float(g.square().sum()) for g in grads))
    max_norm = 1.5
    coef = min(1.0, max_norm / (total + 1e-6))
    params = [torch.nn.Parameter(t.clone()) for t in p0]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    kwargs = dict(lr=0.5, momentum=0.9, weight_decay=0.01, trust_coeff=0.02)
    fused_optim.Lars(params, max_grad_norm=max_norm, **kwargs).step()
    for p, t, g in zip(params, p0, grads):
        r, st = t.clone(), {}
        _reference.lars(r, g * coef, st, **{**DEFAULTS, **kwargs})
        torch.testing.assert_close(p.detach(), r)
        # not the unclipped one: the ratio would differ by the clip factor
        u, su = t.clone(), {}
        _reference.lars(u, g, su, **{**DEFAULTS, **kwargs})
        assert not torch.allclose(p.detach(), u)


@pytest.mark.parametrize("in_step", [True, False], ids=["unscaled_in_step", "by_the_scaler"])
def test_amp_norms_are_of_unscaled_gradients(in_step):
    # Unscaled in registers by the op (or by GradScaler's own pass): the
    # gradient norm is that of the unscaled gradient, so the step equals the
    # unscaled one.
    torch.manual_seed(0)
    p0 = [torch.randn(n) for n in (7, 4099)]
    grads = [torch.randn_like(t) for t in p0]
    kwargs = dict(lr=0.5, momentum=0.9, weight_decay=0.01, trust_coeff=0.02)
    plain = [torch.nn.Parameter(t.clone()) for t in p0]
    for p, g in zip(plain, grads):
        p.grad = g.clone()
    fused_optim.Lars(plain, **kwargs).step()
    scaled = [torch.nn.Parameter(t.clone()) for t in p0]
    cls, scaled_kwargs = unscaling_in_step(fused_optim.Lars, kwargs, in_step)
    opt = cls(scaled, **scaled_kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # (initializes the scale, as scaling a loss does)
    assert opt._step_supports_amp_scaling == in_step  # (the op unscales: grad_scale reaches it)
    for p, g in zip(scaled, grads):
        p.grad = g * 1024.0
    scaler.step(opt)
    scaler.update()
    for a, b in zip(scaled, plain):
        torch.testing.assert_close(a, b)


def test_sparse_gradients_refused():
    p = torch.nn.Parameter(torch.randn(4, 3))
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        fused_optim.Lars([p], lr=0.1).step()


def test_state_has_a_step_only_with_stochastic_rounding():
    a = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = fused_optim.Lars([{"params": [a]}, {"params": [b], "stochastic_rounding": True}],
                           lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    assert set(opt.state[a]) == {"momentum_buffer"}
    assert set(opt.state[b]) == {"momentum_buffer", "step"} and opt.state[b]["step"].item() == 3


# ----- timm's Lars ---------------------------------------------------------------------------


def _timm_lars():
    return timm_optimizer("lars", "Lars")


def _timm_groups(params):
    # timm has no maximize
    n = len(SIZES)
    return [dict(params=params[k * n:(k + 1) * n],
                 **{key: v for key, v in GROUPS[k].items() if key != "maximize"})
            for k in range(len(GROUPS))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_timm(dtype):
    # The same trajectory as timm's Lars, params and momentum buffers, over
    # 12 steps with four groups of different trust settings. (timm computes
    # the norms in the tensor's dtype, we accumulate in float64: float32
    # agrees to assert_close's float32 tolerances.)
    timm_lars = _timm_lars()
    ours_params, theirs_params = _params(dtype), _params(dtype)
    ours = fused_optim.Lars(_timm_groups(ours_params))
    theirs = timm_lars(_timm_groups(theirs_params))
    for step in range(STEPS):
        for a, b, g in zip(ours_params, theirs_params, _grads(step, dtype, ours_params)):
            a.grad, b.grad = g, g.clone()
        ours.step()
        theirs.step()
        for a, b in zip(ours_params, theirs_params):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(ours.state[a]["momentum_buffer"],
                                       theirs.state[b]["momentum_buffer"])


def test_checkpoints_move_between_timm_and_ours():
    timm_lars = _timm_lars()
    ours_params, theirs_params = _params(torch.float32), _params(torch.float32)
    ours = fused_optim.Lars(_timm_groups(ours_params))
    theirs = timm_lars(_timm_groups(theirs_params))

    def run(steps):
        for step in steps:
            for a, b, g in zip(ours_params, theirs_params, _grads(step, torch.float32, ours_params)):
                a.grad, b.grad = g, g.clone()
            ours.step()
            theirs.step()

    run(range(3))
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert set(ours.state_dict()["state"][0]) == {"momentum_buffer"}
    run(range(3, 6))
    for a, b in zip(ours_params, theirs_params):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ours.state[a]["momentum_buffer"], theirs.state[b]["momentum_buffer"])
