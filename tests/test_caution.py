"""timm's cautious Lion and Lamb (``caution=True``, Note [cautious groups]
in fused_optim/_reference.py): a group with it is stepped by the plain
per-tensor implementation, beside fused groups of the same optimizer.

Against timm's own classes (pinned by scripts/bootstrap.sh; skipped where
timm is not installed): trajectories of params and state with cautious and
plain groups mixed, clipping across both, a group switched between the two
paths mid-run, and checkpoints both ways. Without timm: the mask's effect
itself, the precision options refused before anything is written, and
GradScaler."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import fused_optim
from fused_optim import _reference
from harness import assert_optimizer_unchanged, snapshot_optimizer, timm_optimizer

SIZES = [1, 7, 33, 1000, 4099]
STEPS = 10
NAMES = ("Lion", "Lamb")

# Per optimizer: the constructor's arguments, and two groups' overrides:
# the first cautious, the second plain (fused) unless a test makes it
# cautious too. Lamb's decay is coupled in one group and decoupled in the
# other (the mask comes before either).
CONSTRUCTOR = {
    "Lion": dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1),
    "Lamb": dict(lr=0.02, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.05),
}
GROUPS = {
    "Lion": [dict(caution=True), dict(lr=0.005, betas=(0.8, 0.95), weight_decay=0.0)],
    "Lamb": [dict(caution=True), dict(lr=0.01, weight_decay=0.1, decoupled_decay=True,
                                      trust_clip=True)],
}
# float32: timm's moments are lerps where our fused step's are computed in
# float32 registers (the cautious groups' are timm's lerps), and timm's
# LAMB norms are float32 sums where ours accumulate in float64: last-bit
# differences, amplified a little by the trust ratio over 10 steps.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-7, atol=1e-9)}


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64).to(dtype))
            for _ in range(2) for n in SIZES]


def _grads(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def _groups(name, params, groups=None):
    groups = GROUPS[name] if groups is None else groups
    n = len(SIZES)
    return [dict(params=params[k * n:(k + 1) * n], **group) for k, group in enumerate(groups)]


def _pair(name, dtype, groups=None, **constructor):
    """(ours, its params, timm's, its params), built alike."""
    timm_cls = timm_optimizer(name.lower(), name)
    kwargs = {**CONSTRUCTOR[name], **constructor}
    ours_params, theirs_params = _params(dtype), _params(dtype)
    ours = getattr(fused_optim, name)(_groups(name, ours_params, groups), **kwargs)
    theirs = timm_cls(_groups(name, theirs_params, groups), **kwargs)
    return ours, ours_params, theirs, theirs_params


def _step_both(ours, ours_params, theirs, theirs_params, step):
    for a, b, g in zip(ours_params, theirs_params, _grads(step, ours_params)):
        a.grad, b.grad = g, g.clone()
    ours.step()
    theirs.step()


def _assert_same(ours, ours_params, theirs, theirs_params, tol, where):
    for i, (a, b) in enumerate(zip(ours_params, theirs_params)):
        assert_close(a.detach(), b.detach(), **tol, msg=lambda m: f"{where} param {i}: {m}")
        for key, value in theirs.state[b].items():
            if torch.is_tensor(value) and value.shape == b.shape:
                assert_close(ours.state[a][key], value, **tol,
                             msg=lambda m: f"{where} param {i} {key}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("both", [False, True], ids=["cautious_and_fused", "both_cautious"])
def test_matches_timm(name, dtype, both):
    # A cautious group beside a fused one (or two cautious groups, the
    # second with the other options), every step against timm's class with
    # the same groups. Lamb clips by the global norm of both groups
    # (timm's default max_grad_norm=1.0 and ours): the clipping factor
    # crosses from the fused step into the plain one.
    groups = [GROUPS[name][0], dict(GROUPS[name][1], caution=both)]
    ours, ours_params, theirs, theirs_params = _pair(name, dtype, groups)
    for step in range(STEPS):
        _step_both(ours, ours_params, theirs, theirs_params, step)
        _assert_same(ours, ours_params, theirs, theirs_params, TOL[dtype], f"step {step}")
    # (the cautious run is not the plain one: the mask acted)
    plain, plain_params, _, _ = _pair(name, dtype, [dict(g, caution=False) for g in groups])
    for step in range(STEPS):
        for p, g in zip(plain_params, _grads(step, plain_params)):
            p.grad = g
        plain.step()
    assert not torch.allclose(plain_params[3], ours_params[3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_moments_are_timms_bit_for_bit(name, dtype):
    # Cautious groups step in the param's dtype with timm's ops (lerp), so
    # in fp16/bf16 their moments round as timm's: the same bits, and Lion's
    # params too. (LAMB's params are not compared here: its norms, for the
    # trust ratio, accumulate in float64 where timm's are sums in the
    # param's dtype, and it is unclipped here, the clipping factor being
    # torch's clip_grad_norm_'s from a float64 norm: README.)
    groups = [dict(g, caution=True) for g in GROUPS[name]]
    unclipped = dict(max_grad_norm=None) if name == "Lamb" else {}
    ours, ours_params, theirs, theirs_params = _pair(name, dtype, groups, **unclipped)
    for step in range(STEPS):
        _step_both(ours, ours_params, theirs, theirs_params, step)
        for i, (a, b) in enumerate(zip(ours_params, theirs_params)):
            for key in ("exp_avg", "exp_avg_sq"):
                if key in theirs.state[b]:
                    assert torch.equal(ours.state[a][key], theirs.state[b][key]), (step, i, key)
            if name == "Lion":
                assert torch.equal(a, b), (step, i)


@pytest.mark.parametrize("name", NAMES)
def test_switching_a_group_between_cautious_and_fused(name):
    # The two paths share the state layout: a group's caution flag flipped
    # between steps (as timm reads it each step) continues on the same state.
    ours, ours_params, theirs, theirs_params = _pair(name, torch.float64)
    for step in range(8):
        for opt in (ours, theirs):
            opt.param_groups[0]["caution"] = step % 3 != 1
            opt.param_groups[1]["caution"] = step % 2 == 1
        _step_both(ours, ours_params, theirs, theirs_params, step)
        _assert_same(ours, ours_params, theirs, theirs_params, TOL[torch.float64], f"step {step}")


def test_lion_mask_leaves_the_disagreeing_elements():
    # Without decay an element whose update sign(c) disagrees with its
    # gradient (or is 0) does not move; the others move by lr / (the
    # fraction kept), the mask's mean rescaling.
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4099))
    # (beta2 0.5: the second gradient disagrees with the momentum often)
    opt = fused_optim.Lion([p], lr=0.01, betas=(0.9, 0.5), caution=True)
    p.grad = torch.randn(4099)
    opt.step()  # (the first step: c = 0.1 g, all kept)
    before, m = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    p.grad = torch.randn(4099)
    opt.step()
    c = 0.9 * m + 0.1 * p.grad
    kept = torch.sign(c) * p.grad > 0
    assert 0.2 < kept.float().mean() < 0.9
    moved = p.detach() - before
    assert torch.equal(moved[~kept], torch.zeros_like(moved[~kept]))
    expected = -0.01 * torch.sign(c[kept]) / kept.float().mean()
    assert_close(moved[kept], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_precision_options_are_refused(name):
    # The plain step runs in the param's dtype and keeps torch's state: the
    # precision options cannot apply. Refused by the constructor, and by a
    # step whose group was made cautious later, before anything is written.
    cls = getattr(fused_optim, name)
    p = torch.nn.Parameter(torch.randn(33, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="master_weights need.*caution=True runs the plain"):
        cls([p], caution=True, master_weights=True)
    opt = cls([p], state_dtype=torch.float32)
    p.grad = torch.randn(33, dtype=torch.bfloat16)
    opt.step()
    opt.param_groups[0]["caution"] = True
    snap = snapshot_optimizer(opt)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="state_dtype need.*caution=True"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert_optimizer_unchanged(opt, snap, "refused cautious step")


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler(name):
    # Under GradScaler a cautious group's gradients are unscaled before the
    # plain step (by GradScaler itself: the class unscales in its own
    # kernels only with master_weights, which caution refuses), and a step
    # with an inf is skipped whole: the same trajectory as unscaled
    # gradients given directly.
    cls = getattr(fused_optim, name)
    params, plain_params = _params(torch.float32), _params(torch.float32)
    opt = cls(_groups(name, params), **CONSTRUCTOR[name])
    plain = cls(_groups(name, plain_params), **CONSTRUCTOR[name])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    scaler.scale(torch.ones(()))  # (GradScaler makes its scale with the first loss it scales)
    for step in range(4):
        grads = _grads(step, params)
        if step == 2:
            grads[3] = grads[3].clone()
            grads[3][5] = float("inf")
        for p, g in zip(params, grads):
            p.grad = g * scaler.get_scale()
        snap = snapshot_optimizer(opt)
        scaler.step(opt)
        scaler.update()
        if step == 2:
            assert_optimizer_unchanged(opt, snap, "skipped step")
            continue
        for p, g in zip(plain_params, grads):
            p.grad = g.clone()
        plain.step()
        for a, b in zip(params, plain_params):
            assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_move_between_timm_and_ours(name):
    # timm's cautious groups load into ours and continue there as in timm,
    # and ours into timm's (same state layout; Lamb's group step as in
    # test_lamb.py's checkpoint test).
    ours, ours_params, theirs, theirs_params = _pair(name, torch.float64)
    for step in range(3):
        _step_both(ours, ours_params, theirs, theirs_params, step)
    ours_sd, theirs_sd = copy.deepcopy(ours.state_dict()), copy.deepcopy(theirs.state_dict())
    assert [g["caution"] for g in ours_sd["param_groups"]] == [True, False]
    timm_cls = type(theirs)
    loaded_ours_params = [torch.nn.Parameter(p.detach().clone()) for p in theirs_params]
    loaded_ours = getattr(fused_optim, name)(_groups(name, loaded_ours_params, [{}, {}]),
                                             **CONSTRUCTOR[name])
    loaded_ours.load_state_dict(theirs_sd)
    assert [g["caution"] for g in loaded_ours.param_groups] == [True, False]
    loaded_theirs_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    loaded_theirs = timm_cls(_groups(name, loaded_theirs_params, [{}, {}]), **CONSTRUCTOR[name])
    loaded_theirs.load_state_dict(ours_sd)
    for step in range(3, 6):
        _step_both(ours, ours_params, theirs, theirs_params, step)
        _step_both(loaded_ours, loaded_ours_params, loaded_theirs, loaded_theirs_params, step)
    tol = TOL[torch.float64]
    _assert_same(loaded_ours, loaded_ours_params, theirs, theirs_params, tol, "timm -> ours")
    _assert_same(ours, ours_params, loaded_theirs, loaded_theirs_params, tol, "ours -> timm")


def test_reference_mask_is_timms():
    # The one mask function both plain steps use, against timm's formula
    # written out: zero where u * g <= 0 (a zero gradient included), the
    # rest divided by the kept fraction, at least 1e-3.
    u = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0])
    g = torch.tensor([2.0, 1.0, -1.0, 0.0, -3.0, 1.0])
    assert torch.equal(_reference.cautious(u.clone(), g),
                       torch.tensor([2.0, 0.0, 0.0, 0.0, -2.0, 4.0]))
    tiny = torch.zeros(10_000)
    tiny[0] = 1.0
    assert_close(_reference.cautious(tiny.clone(), tiny)[0], torch.tensor(1 / 1e-3))


@pytest.mark.parametrize("name", NAMES)
def test_compiled_step_equals_eager(name):
    # Under torch.compile the cautious group runs eagerly after the traced
    # fused calls (as torch-path groups do, Note [traced step]), with the
    # global norm of both groups for Lamb's clipping: the same bits as the
    # eager step.
    torch._dynamo.reset()
    params, eager_params = _params(torch.float32), _params(torch.float32)
    cls = getattr(fused_optim, name)
    opt = cls(_groups(name, params), **CONSTRUCTOR[name])
    eager = cls(_groups(name, eager_params), **CONSTRUCTOR[name])
    compiled = torch.compile(opt.step, backend="aot_eager")
    for step in range(4):
        for p, q, g in zip(params, eager_params, _grads(step, params)):
            p.grad, q.grad = g, g.clone()
        compiled()
        eager.step()
        for i, (p, q) in enumerate(zip(params, eager_params)):
            assert torch.equal(p, q), f"step {step} param {i}"
            for key, value in eager.state[q].items():
                assert torch.equal(opt.state[p][key], value), f"step {step} param {i} {key}"


@pytest.mark.parametrize("name", ["SGD", "Adam", "Lars"])
def test_other_classes_ignore_a_caution_key(name):
    # torch.optim ignores a group key it does not know; so do the classes
    # without timm's caution: a group with a stray "caution" stays on the
    # fused step (with master weights, which the unfused step refuses).
    p = torch.nn.Parameter(torch.randn(33, dtype=torch.bfloat16))
    opt = getattr(fused_optim, name)([{"params": [p], "caution": True}], lr=1e-3,
                                     master_weights=True)
    p.grad = torch.randn(33, dtype=torch.bfloat16)
    opt.step()
    assert "master_param" in opt.state[p]
