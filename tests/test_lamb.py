"""Lamb (LAMB), which torch.optim lacks: against its float64 reference
(fused_optim._reference.Lamb over _reference.lamb: You et al. 2020 with
timm's options), against timm's Lamb itself where timm is installed
(trajectories and checkpoints both ways), and the norms of the trust ratio:
||p|| and ||u|| of every tensor of a call computed inside the one lamb_ op
call, the global norm (max_grad_norm) by one sum_of_squares call, the norms
of unscaled (AMP) and clipped gradients, zero norms giving a ratio of 1.

The table-driven suites cover Lamb through its reference class
(optim_configs.torch_class); these tests add the rule in float64 over vector
bodies and tails, several groups with different settings, and the package
Lamb users come from."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch.testing import assert_close

import fused_optim
from fused_optim import _reference

from harness import (P, assert_states_equal, run_low_precision, seeded_grads, timm_optimizer,
                     trust_ratio_params, unscaling_in_step)
from optim_configs import CONFIGS_BY_ID, OptimConfig

SIZES = [1, 7, 33, 4099, 5]
STEPS = 12

# Groups with different settings: the defaults (adapted, coupled decay);
# no bias correction, no grad averaging, LAMBC's trust clipping (params
# scaled up so that ||p|| / ||u|| > 1 and the clip bites); always_adapt
# without decay, maximize; weight_decay 0 without always_adapt (excluded
# from the ratio: an Adam step); decoupled decay (the param decayed before
# its norm is taken). The last tensor of each group starts all zeros (its
# param norm is 0: ratio 1).
GROUPS = [
    dict(lr=0.02, weight_decay=0.01),
    dict(lr=0.01, betas=(0.8, 0.99), eps=1e-5, weight_decay=0.1, bias_correction=False,
         grad_averaging=False, trust_clip=True),
    dict(lr=0.03, weight_decay=0.0, always_adapt=True, maximize=True),
    dict(lr=0.005, weight_decay=0.0),
    dict(lr=0.02, betas=(0.5, 0.9), weight_decay=0.05, decoupled_decay=True),
]
PARAM_SCALES = [1.0, 4.0, 1.0, 1.0, 2.0]
DEFAULTS = dict(lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                grad_averaging=True, trust_clip=False, always_adapt=False, decoupled_decay=False,
                maximize=False)

# Tolerances of test_lars.py (float32: rtol 1e-5, atol 1e-6; float64:
# assert_close's), atol relative to the largest magnitude of the compared
# tensor: with clipping to max_grad_norm=1 the gradients are ~1e-2 and
# exp_avg_sq ~1e-6, which an absolute 1e-6 would not compare at all.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-7, atol=1e-7)}


def assert_close_scaled(actual, expected, rtol, atol, msg=""):
    scale = float(expected.detach().abs().max()) if expected.numel() else 1.0
    assert_close(actual.detach().to(expected.dtype), expected.detach(), rtol=rtol,
                 atol=atol * max(scale, 1e-30), msg=lambda m: f"{msg}: {m}")


def _params(dtype, seed=0):
    return trust_ratio_params(dtype, len(GROUPS), SIZES, PARAM_SCALES, seed)


def _grads(step, dtype, params):
    return seeded_grads(step, dtype, params)


def _groups(params, groups=GROUPS, **extra):
    n = len(SIZES)
    return [dict(params=params[k * n:(k + 1) * n], **groups[k], **extra)
            for k in range(len(groups))]


def _global_norm(grads) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


def _assert_state_close(ours, ref, p, r, tol, where):
    st, rt = ours.state[p], ref.state[r]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"}, f"{where}: state keys {sorted(st)}"
    assert float(st["step"]) == float(rt["step"]), f"{where}: step"
    for key in ("exp_avg", "exp_avg_sq"):
        assert st[key].dtype == p.dtype, f"{where}: {key} dtype"
        assert_close_scaled(st[key], rt[key], **tol, msg=f"{where} {key}")


# ----- the float64 reference -----------------------------------------------------------------


@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no_clip", "clip"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_float64_reference(dtype, max_grad_norm):
    # Ours in `dtype` against the reference class in float64 from the same
    # start, after every step, on params and state. With max_grad_norm the
    # global norm (~145) clips every step, and the decoupled group has its
    # own max_grad_norm=None: measured in the global norm, not clipped.
    groups = [dict(g) for g in GROUPS]
    if max_grad_norm is not None:
        groups[-1]["max_grad_norm"] = None
    params = _params(dtype)
    ref_params = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
    ours = fused_optim.Lamb(_groups(params, groups), max_grad_norm=max_grad_norm)
    ref = _reference.Lamb(_groups(ref_params, groups), max_grad_norm=max_grad_norm)
    tol = TOL[dtype]
    for step in range(STEPS):
        grads = _grads(step, dtype, params)
        for p, r, g in zip(params, ref_params, grads):
            p.grad, r.grad = g.clone(), g.double()
        ours.step()
        ref.step()
        for i, (p, r, g) in enumerate(zip(params, ref_params, grads)):
            where = f"{dtype} step {step} param {i}"
            assert p.dtype == dtype
            assert_close_scaled(p, r, **tol, msg=where)
            _assert_state_close(ours, ref, p, r, tol, where)
            assert torch.equal(p.grad, g), f"{where}: the step wrote the gradient"
        if max_grad_norm is None:
            assert ours.grad_norm is None
        else:
            norm = _global_norm(grads)
            assert norm > 10 * max_grad_norm  # (clipping is active)
            assert ours.grad_norm is not None
            assert_close(float(ours.grad_norm), norm, rtol=2e-6, atol=0.0)


def test_step_is_per_param():
    # A param without a gradient takes no step: its own counter (bias
    # correction) stays behind, as torch.optim's Adam's; the checkpoint's
    # group "step" (for timm) is the largest count of the group.
    a, b = (torch.nn.Parameter(torch.randn(9, dtype=torch.float64)) for _ in range(2))
    ra, rb = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))
    kwargs = dict(lr=0.05, weight_decay=0.0, max_grad_norm=None)
    ours, ref = fused_optim.Lamb([a, b], **kwargs), _reference.Lamb([ra, rb], **kwargs)
    assert "step" not in ours.state_dict()["param_groups"][0]
    for step in range(6):
        g = torch.Generator().manual_seed(step)
        a.grad = torch.randn(9, generator=g, dtype=torch.float64)
        b.grad = torch.randn(9, generator=g, dtype=torch.float64) if step % 3 == 0 else None
        ra.grad, rb.grad = a.grad.clone(), None if b.grad is None else b.grad.clone()
        ours.step()
        ref.step()
    assert float(ours.state[a]["step"]) == 6 and float(ours.state[b]["step"]) == 2
    for p, r in ((a, ra), (b, rb)):
        assert_close(p, r)
        _assert_state_close(ours, ref, p, r, TOL[torch.float64], "per-param step")
    group_step = ours.state_dict()["param_groups"][0]["step"]
    assert isinstance(group_step, torch.Tensor) and group_step.dim() == 0 and group_step == 6
    assert "step" not in ours.param_groups[0]  # (only in the checkpoint)


def test_zero_param_and_zero_update_take_ratio_one():
    # ||p|| = 0: ratio 1, the step is the Adam update plus the decay term.
    # ||u|| = 0 (zero gradient, decoupled decay): ratio 1 (not 0 / 0 or
    # ||p|| / 0), the step is the decay alone.
    lr, wd, eps = 0.1, 0.5, 1e-6
    g = torch.tensor([2.0, -1.0, 0.5, 3.0, -0.25], dtype=torch.float64)
    zero = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
    zero.grad = g.clone()
    fused_optim.Lamb([zero], lr=lr, weight_decay=wd, max_grad_norm=None).step()
    # first step with bias correction: m / bc1 = g, sqrt(v / bc2) = |g|
    assert_close(zero.detach(), -lr * g / (g.abs() + eps))
    p0 = torch.tensor([1.0, -2.0, 3.0, 0.5, 4.0], dtype=torch.float64)
    still = torch.nn.Parameter(p0.clone())
    still.grad = torch.zeros(5, dtype=torch.float64)
    fused_optim.Lamb([still], lr=lr, weight_decay=wd, decoupled_decay=True,
                     max_grad_norm=None).step()
    assert_close(still.detach(), p0 - lr * wd * p0)
    # always_adapt with no decay and a zero gradient: nothing moves
    idle = torch.nn.Parameter(p0.clone())
    idle.grad = torch.zeros(5, dtype=torch.float64)
    fused_optim.Lamb([idle], lr=lr, weight_decay=0.0, always_adapt=True, max_grad_norm=None).step()
    assert torch.equal(idle.detach(), p0)


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("trust_clip", [False, True], ids=["ratio", "clipped_ratio"])
def test_ratio_is_the_papers(trust_clip, decoupled):
    # One first step written out (bias-corrected: m / bc1 = g, v / bc2 =
    # g^2): u = g / (|g| + eps) (+ wd p), r = ||p|| / ||u|| (clipped at 1),
    # p - lr r u; decoupled decay shrinks p before its norm is taken.
    torch.manual_seed(0)
    lr, wd, eps = 0.01, 0.1, 1e-6
    for scale in (0.1, 10.0):  # ratio below and above 1
        p0, g = torch.randn(100, dtype=torch.float64) * scale, torch.randn(100, dtype=torch.float64)
        p = torch.nn.Parameter(p0.clone())
        p.grad = g.clone()
        fused_optim.Lamb([p], lr=lr, weight_decay=wd, eps=eps, trust_clip=trust_clip,
                         decoupled_decay=decoupled, max_grad_norm=None).step()
        u = g / (g.abs() + eps)
        start = p0 * (1 - lr * wd) if decoupled else p0
        if not decoupled:
            u = u + wd * p0
        ratio = float(start.norm() / u.norm())
        if trust_clip:
            ratio = min(ratio, 1.0)
        assert_close(p.detach(), start - lr * ratio * u)


def test_group_without_decay_is_not_adapted_unless_always_adapt():
    torch.manual_seed(0)
    p0, g = torch.randn(50, dtype=torch.float64) * 5, torch.randn(50, dtype=torch.float64)
    u = g / (g.abs() + 1e-6)
    plain = torch.nn.Parameter(p0.clone())
    plain.grad = g.clone()
    fused_optim.Lamb([plain], lr=0.1, weight_decay=0.0, max_grad_norm=None).step()
    assert_close(plain.detach(), p0 - 0.1 * u)
    adapted = torch.nn.Parameter(p0.clone())
    adapted.grad = g.clone()
    fused_optim.Lamb([adapted], lr=0.1, weight_decay=0.0, always_adapt=True,
                     max_grad_norm=None).step()
    assert_close(adapted.detach(), p0 - 0.1 * float(p0.norm() / u.norm()) * u)


# ----- one pass for the norms ----------------------------------------------------------------


def _op_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = [e.name for e in prof.events()]
    return names.count("fused_optim::sum_of_squares"), names.count("fused_optim::lamb_")


@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no_clip", "clip"])
def test_norms_of_all_tensors_in_the_one_op_call(max_grad_norm):
    # The five groups (one dtype) in one lamb_ call, which computes every
    # tensor's ||p|| and ||u|| itself (the update norm needs the update,
    # which only the op computes): no sum_of_squares for them. With
    # max_grad_norm, one sum_of_squares per step: the global norm, over
    # every gradient.
    params = _params(torch.float32)
    opt = fused_optim.Lamb(_groups(params), max_grad_norm=max_grad_norm)
    for p, g in zip(params, _grads(0, torch.float32, params)):
        p.grad = g
    opt.step()  # (plans and state on the first step)
    for p, g in zip(params, _grads(1, torch.float32, params)):
        p.grad = g
    sums, lamb_calls = _op_calls(opt.step)
    assert lamb_calls == 1
    assert sums == (0 if max_grad_norm is None else 1)


# ----- AMP -----------------------------------------------------------------------------------


def _amp_setup(max_grad_norm):
    torch.manual_seed(0)
    p0 = [torch.randn(n) * 2 for n in (7, 33, 4099)]
    kwargs = dict(lr=0.02, weight_decay=0.01, max_grad_norm=max_grad_norm)
    return p0, kwargs


def _amp_grads(step, p0):
    g = torch.Generator().manual_seed(10 + step)
    return [torch.randn(t.shape, generator=g) for t in p0]


@pytest.mark.parametrize("in_step", [True, False], ids=["unscaled_in_step", "by_the_scaler"])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no_clip", "clip"])
def test_grad_scaler_equals_unscaled_run(max_grad_norm, in_step):
    # Unscaled in registers by the op (or by GradScaler's own pass): the
    # moments, both norms of the ratio and the global norm are of the
    # unscaled gradient, so the steps equal the unscaled ones.
    p0, kwargs = _amp_setup(max_grad_norm)
    plain = [torch.nn.Parameter(t.clone()) for t in p0]
    plain_opt = fused_optim.Lamb(plain, **kwargs)
    scaled = [torch.nn.Parameter(t.clone()) for t in p0]
    cls, scaled_kwargs = unscaling_in_step(fused_optim.Lamb, kwargs, in_step)
    opt = cls(scaled, **scaled_kwargs)
    assert opt._step_supports_amp_scaling == in_step  # (grad_scale and found_inf reach the op)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
    for step in range(4):
        grads = _amp_grads(step, p0)
        for p, g in zip(plain, grads):
            p.grad = g.clone()
        plain_opt.step()
        scaler.scale(torch.ones(()))  # (initializes the scale, as scaling a loss does)
        scale = scaler.get_scale()  # (a power of two: the scaled gradients are exact)
        for p, g in zip(scaled, grads):
            p.grad = g * scale
        scaler.step(opt)
        scaler.update()
        for a, b in zip(scaled, plain):
            assert_close(a, b)
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert_close(opt.state[a][key], plain_opt.state[b][key])
        if max_grad_norm is not None:
            assert_close(opt.grad_norm, plain_opt.grad_norm)
    assert scaler.get_scale() > 1024.0  # (the scale grew: not one constant scale)


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params},
            [p.grad.clone() for p in params])


def _assert_unchanged(opt, params, snap, where):
    values, states, grads = snap
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), values[i]), f"{where}: param {i} changed"
        assert set(opt.state[p]) == set(states[id(p)]), f"{where}: state keys of param {i}"
        for key, value in states[id(p)].items():
            assert torch.equal(opt.state[p][key], value), f"{where}: {key} of param {i} changed"
        assert_close(p.grad, grads[i], rtol=0, atol=0, equal_nan=True,
                     msg=lambda m: f"{where}: grad {i} changed: {m}")


@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no_clip", "clip"])
def test_found_inf_skips_the_step(max_grad_norm):
    p0, kwargs = _amp_setup(max_grad_norm)
    params = [torch.nn.Parameter(t.clone()) for t in p0]
    cls, kwargs = unscaling_in_step(fused_optim.Lamb, kwargs)
    opt = cls(params, **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(2):
        scaler.scale(torch.ones(()))
        for p, g in zip(params, _amp_grads(step, p0)):
            p.grad = g * scaler.get_scale()
        scaler.step(opt)
        scaler.update()
    scaler.scale(torch.ones(()))
    for p, g in zip(params, _amp_grads(2, p0)):
        p.grad = g * scaler.get_scale()
    params[2].grad[5] = float("nan")
    snap = _snapshot(opt, params)
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < scale  # (the scaler saw the NaN)
    _assert_unchanged(opt, params, snap, "AMP-skipped step")
    assert all(float(opt.state[p]["step"]) == 2 for p in params)


# ----- refused -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no_clip", "clip"])
@pytest.mark.parametrize("cls", [fused_optim.Lamb, _reference.Lamb], ids=["fused", "reference"])
def test_sparse_gradients_refused(cls, max_grad_norm):
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    opt = cls(params, lr=0.1, max_grad_norm=max_grad_norm)
    for p in params:
        p.grad = torch.randn(4, 3)
    opt.step()
    params[0].grad = torch.randn(4, 3)
    params[1].grad = torch.randn(4, 3).to_sparse()
    snap = ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params},
            [params[0].grad.clone(), params[1].grad.to_dense()])
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    params[1].grad = params[1].grad.to_dense()  # (for the comparison)
    _assert_unchanged(opt, params, snap, "refused sparse step")


@pytest.mark.parametrize("cls", [fused_optim.Lamb, _reference.Lamb], ids=["fused", "reference"])
@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), "Invalid learning rate"),
    (dict(eps=-1e-6), "Invalid epsilon"),
    (dict(lr=float("nan")), "Invalid learning rate"),
    (dict(lr=torch.tensor([1e-3, 1e-3])), "learning rate must be a scalar or scalar tensor"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0"),
    (dict(betas=(-0.1, 0.999)), "Invalid beta parameter at index 0"),
    (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1"),
    (dict(weight_decay=-0.01), "Invalid weight_decay"),
    (dict(max_grad_norm=0.0), "Invalid max_grad_norm value"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_constructor_errors(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(lr=-1e-3), dict(eps=-1e-6), dict(weight_decay=-0.01), dict(lr=torch.tensor([1e-3, 1e-3])),
    dict(lr=torch.tensor(-1e-3)),
], ids=str)
def test_constructor_errors_are_timms(kwargs):
    # Where timm's Lamb refuses an argument, ours raises its exception, with
    # its message (what timm lets through and we refuse: the cases above).
    params = [torch.nn.Parameter(torch.randn(3))]
    messages = []
    for cls in (timm_lamb(), fused_optim.Lamb, _reference.Lamb):
        with pytest.raises(ValueError) as raised:
            cls(params, **kwargs)
        messages.append(str(raised.value))
    assert messages[1:] == [messages[0]] * 2


def test_signature_is_timms_plus_keywords():
    # timm's positional parameters and defaults; keyword-only: maximize and
    # the precision options (the reference: maximize).
    timms = ["params", "lr", "bias_correction", "betas", "eps", "weight_decay", "grad_averaging",
             "max_grad_norm", "trust_clip", "always_adapt", "caution", "decoupled_decay",
             "corrected_weight_decay", "foreach"]
    extra = {fused_optim.Lamb: {"maximize": False, "master_weights": False, "state_dtype": None,
                                "stochastic_rounding": False},
             _reference.Lamb: {"maximize": False}}
    for cls, keywords in extra.items():
        params = list(inspect.signature(cls).parameters.values())
        assert [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD] == timms, cls
        assert {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY} == keywords, cls
        defaults = {p.name: p.default for p in params if p.default is not p.empty}
        assert defaults == {**DEFAULTS, "max_grad_norm": 1.0, "caution": False,
                            "corrected_weight_decay": False, "foreach": None, **keywords}, cls


# ----- timm's Lamb ---------------------------------------------------------------------------


def timm_lamb():
    """timm's Lamb class, or a pytest skip where timm is not installed."""
    return timm_optimizer("lamb", "Lamb")


def _timm_groups(params):
    # timm has no maximize
    return _groups(params, [{k: v for k, v in g.items() if k != "maximize"} for g in GROUPS])


def _clip_rtol(norm):
    # timm clips with min(1, max_grad_norm / norm), torch's formula (ours)
    # with max_grad_norm / (norm + 1e-6): the factors differ by a relative
    # ~1e-6 / norm. exp_avg is linear in the gradients (a relative 1e-6 /
    # norm), exp_avg_sq quadratic (twice that); the update m / (sqrt(v) +
    # eps) and the ratio are scale-free but for eps (far smaller
    # differences). Three times the largest, for the rounding on top.
    return 3 * 2 * 1e-6 / norm


@pytest.mark.parametrize("variant", ["no_clip", "clip", "decoupled_trust_clip",
                                     "decoupled_corrected_scheduled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_timm(dtype, variant):
    # The same trajectory as timm's Lamb, params and state, over 12 steps
    # with every param given a gradient at every step (timm's step counter is
    # the group's). (timm computes its norms in the tensor's dtype, we
    # accumulate them in float64.) The corrected decay scales by lr^2 over
    # the constructor's lr (0.04, above every group's), under a schedule.
    timm_cls = timm_lamb()
    groups = [{k: v for k, v in g.items() if k != "maximize"} for g in GROUPS]
    constructor = {}
    if variant == "decoupled_trust_clip":
        groups = [dict(g, decoupled_decay=True, trust_clip=True) for g in groups]
    if variant == "decoupled_corrected_scheduled":
        if "corrected_weight_decay" not in inspect.signature(timm_cls).parameters:
            pytest.skip("this timm's Lamb has no corrected_weight_decay")
        groups = [dict(g, decoupled_decay=True, corrected_weight_decay=True) for g in groups]
        constructor = dict(lr=0.04)
    max_grad_norm = 1.0 if variant == "clip" else None
    ours_params, theirs_params = _params(dtype), _params(dtype)
    ours = fused_optim.Lamb(_groups(ours_params, groups), max_grad_norm=max_grad_norm, **constructor)
    theirs = timm_cls(_groups(theirs_params, groups), max_grad_norm=max_grad_norm, **constructor)
    schedules = [torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
                 for opt in (ours, theirs) if constructor]
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1.3e-6, atol=1e-5)
    for step in range(STEPS):
        grads = _grads(step, dtype, ours_params)
        for a, b, g in zip(ours_params, theirs_params, grads):
            a.grad, b.grad = g, g.clone()  # (timm clips its p.grad in place)
        ours.step()
        theirs.step()
        for schedule in schedules:
            schedule.step()
        step_tol = dict(tol)
        if max_grad_norm is not None:
            norm = _global_norm(grads)
            assert norm > 10 * max_grad_norm  # (clipping is active)
            step_tol["rtol"] = max(tol["rtol"], _clip_rtol(norm))
        for i, (a, b) in enumerate(zip(ours_params, theirs_params)):
            where = f"{dtype} {variant} step {step} param {i}"
            assert_close_scaled(a, b, **step_tol, msg=where)
            assert float(ours.state[a]["step"]) == theirs.param_groups[i // len(SIZES)]["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                assert_close_scaled(ours.state[a][key], theirs.state[b][key], **step_tol,
                                    msg=f"{where} {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_moments_are_timms_bit_for_bit(dtype):
    # The moments read only the gradients (timm's L2 decay goes into the
    # update, not the gradient), so they can be compared bit for bit over
    # steps whose params drift apart by rounding (the norms), over groups
    # with and without grad averaging (exp_avg.lerp_(grad, 1 - beta1), else
    # mul_(beta1).add_(grad)) and a lerp weight on either side of torch's
    # 0.5 (betas 0.9 and 0.5: lerp anchors at the other end).
    timm_cls = timm_lamb()
    ours_params, theirs_params = _params(dtype), _params(dtype)
    ours = fused_optim.Lamb(_timm_groups(ours_params), max_grad_norm=None)
    theirs = timm_cls(_timm_groups(theirs_params), max_grad_norm=None)
    assert {g["grad_averaging"] for g in ours.param_groups} == {True, False}
    assert {g["betas"][0] for g in ours.param_groups} >= {0.9, 0.5}
    for step in range(STEPS):
        grads = _grads(step, dtype, ours_params)
        for a, b, g in zip(ours_params, theirs_params, grads):
            a.grad, b.grad = g, g.clone()
        ours.step()
        theirs.step()
        assert_states_equal(ours, ours_params, theirs, theirs_params,
                            ("exp_avg", "exp_avg_sq"), f"step {step}")


def test_checkpoints_move_between_timm_and_ours():
    # ours -> timm: our checkpoint's groups carry timm's "step" (the
    # group's largest count), so timm continues with the right bias
    # correction; timm -> ours: each param's "step" from its group's, which
    # ours does not keep as a group key. Both continue as the uninterrupted
    # runs. (The group of weight_decay 0 without always_adapt takes an
    # unadapted step, whose size depends on the bias correction.)
    timm_cls = timm_lamb()
    dtype = torch.float32
    ours_params, theirs_params = _params(dtype), _params(dtype)
    ours = fused_optim.Lamb(_timm_groups(ours_params), max_grad_norm=None)
    theirs = timm_cls(_timm_groups(theirs_params), max_grad_norm=None)
    assert all("step" not in g for g in ours.state_dict()["param_groups"])

    def run(pairs, steps):
        for step in steps:
            grads = _grads(step, dtype, ours_params)
            for opt, params in pairs:
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                opt.step()

    run([(ours, ours_params), (theirs, theirs_params)], range(3))
    ours_sd, theirs_sd = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
    assert [g["step"] for g in ours_sd["param_groups"]] == [3] * len(GROUPS)
    for ours_group, timms_group in zip(ours_sd["param_groups"], theirs_sd["param_groups"]):
        # (timm's kind: a 0-d tensor, so that DCP takes one for the other)
        step, timms = ours_group["step"], timms_group["step"]
        assert isinstance(step, torch.Tensor) and isinstance(timms, torch.Tensor)
        assert (step.shape, step.dtype, step.device) == (timms.shape, timms.dtype, timms.device)

    # timm -> ours
    ours_loaded_params = [torch.nn.Parameter(p.detach().clone()) for p in theirs_params]
    ours_loaded = fused_optim.Lamb(_timm_groups(ours_loaded_params), max_grad_norm=None)
    ours_loaded.load_state_dict(theirs_sd)
    assert all("step" not in g for g in ours_loaded.param_groups)
    for p in ours_loaded_params:
        assert set(ours_loaded.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert isinstance(ours_loaded.state[p]["step"], torch.Tensor)
        assert float(ours_loaded.state[p]["step"]) == 3
    # ours -> timm
    theirs_loaded_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    theirs_loaded = timm_cls(_timm_groups(theirs_loaded_params), max_grad_norm=None)
    theirs_loaded.load_state_dict(ours_sd)
    assert [g["step"] for g in theirs_loaded.param_groups] == [3] * len(GROUPS)

    run([(ours, ours_params), (theirs, theirs_params), (ours_loaded, ours_loaded_params),
         (theirs_loaded, theirs_loaded_params)], range(3, 6))
    for i in range(len(ours_params)):
        for (lo, lp), (uo, up) in (
            ((ours_loaded, ours_loaded_params), (ours, ours_params)),
            ((theirs_loaded, theirs_loaded_params), (theirs, theirs_params)),
        ):
            where = f"{type(lo).__module__} loaded, param {i}"
            assert_close_scaled(lp[i], up[i], rtol=1.3e-6, atol=1e-5, msg=where)
            for key in ("exp_avg", "exp_avg_sq"):
                assert_close_scaled(lo.state[lp[i]][key], uo.state[up[i]][key], rtol=1.3e-6,
                                    atol=1e-5, msg=f"{where} {key}")
    assert all(float(ours_loaded.state[p]["step"]) == 6 for p in ours_loaded_params)
    assert [g["step"] for g in theirs_loaded.param_groups] == [6] * len(GROUPS)


def test_checkpoint_round_trip_through_timm_takes_timms_count():
    # ours -> timm -> ours: timm keeps our per-param "step"s as they were
    # while its group count goes on, and saves both; ours must resume from
    # the group count (Note [LAMB's step in checkpoints]), as timm would.
    timm_cls = timm_lamb()
    dtype = torch.float32

    def run(opt, params, steps):
        for step in steps:
            for p, g in zip(params, _grads(step, dtype, params)):
                p.grad = g.clone()
            opt.step()

    def clone(params):
        return [torch.nn.Parameter(p.detach().clone()) for p in params]

    first_params = _params(dtype)
    first = fused_optim.Lamb(_timm_groups(first_params), max_grad_norm=None)
    run(first, first_params, range(3))
    timm_params = clone(first_params)
    timms = timm_cls(_timm_groups(timm_params), max_grad_norm=None)
    timms.load_state_dict(copy.deepcopy(first.state_dict()))
    run(timms, timm_params, range(3, 7))
    saved = copy.deepcopy(timms.state_dict())
    assert all(float(st["step"]) == 3 for st in saved["state"].values())  # (timm's stale copies)
    ours_params, theirs_params = clone(timm_params), clone(timm_params)
    ours = fused_optim.Lamb(_timm_groups(ours_params), max_grad_norm=None)
    ours.load_state_dict(copy.deepcopy(saved))
    assert all(float(ours.state[p]["step"]) == 7 for p in ours_params)
    theirs = timm_cls(_timm_groups(theirs_params), max_grad_norm=None)
    theirs.load_state_dict(copy.deepcopy(saved))
    run(ours, ours_params, range(7, 10))
    run(theirs, theirs_params, range(7, 10))
    for i, (a, b) in enumerate(zip(ours_params, theirs_params)):
        assert_close_scaled(a, b, rtol=1.3e-6, atol=1e-5, msg=f"param {i}")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close_scaled(ours.state[a][key], theirs.state[b][key], rtol=1.3e-6, atol=1e-5,
                                msg=f"param {i} {key}")


def test_a_stale_group_count_kept_by_a_per_param_counter_is_not_taken():
    # ours -> a per-param counter that keeps our group "step" as it was
    # (torch.optim's load keeps unknown group keys: the reference class)
    # -> ours: the params' own counts, above the group's, are kept.
    dtype = torch.float32
    params = _params(dtype)
    first = fused_optim.Lamb(_timm_groups(params), max_grad_norm=None)
    for step in range(2):
        for p, g in zip(params, _grads(step, dtype, params)):
            p.grad = g
        first.step()
    counter = _reference.Lamb(_timm_groups(params), max_grad_norm=None)
    counter.load_state_dict(copy.deepcopy(first.state_dict()))
    for step in range(2, 5):
        for p, g in zip(params, _grads(step, dtype, params)):
            p.grad = g
        counter.step()
    saved = copy.deepcopy(counter.state_dict())
    assert all(g["step"] == 2 for g in saved["param_groups"])  # (stale)
    resumed = fused_optim.Lamb(_timm_groups(params), max_grad_norm=None)
    resumed.load_state_dict(saved)
    assert all(float(resumed.state[p]["step"]) == 5 for p in params)


class _LambLeavingTheFirstParam(fused_optim.Lamb):
    """A broken Lamb: its step leaves the first param where it was."""

    def step(self, closure=None):
        first = self.param_groups[0]["params"][0]
        kept = first.detach().clone()
        loss = super().step(closure)
        with torch.no_grad():
            first.copy_(kept)
        return loss


class _BrokenLambConfig(OptimConfig):
    @property
    def ours_cls(self):
        return _LambLeavingTheFirstParam


def test_low_precision_rule_fails_an_update_skipped_under_the_pooled_bound():
    # float16 LAMB: beside tensors of thousands of elements, whose float16
    # rounding sets the pooled error bound, a one-element param moves by
    # less than that bound; run_low_precision checks it on its own.
    specs = [({}, [P((1,)), P((4099,)), P((65537,)), P((131079,))])]
    good = CONFIGS_BY_ID["lamb"]
    run_low_precision(good, specs, 10, torch.float16)
    broken = _BrokenLambConfig("lamb_broken", "Lamb", good.kwargs)
    with pytest.raises(AssertionError, match="param 0: ours' error vs float64 .* an update skipped"):
        run_low_precision(broken, specs, 10, torch.float16)
