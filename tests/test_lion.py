"""Lion, which torch.optim lacks: against its float64 reference rule
(fused_optim._reference.lion, the paper's Algorithm 2 in lion-pytorch's op
order) and, where they are installed, against lion-pytorch itself and
timm's Lion (whose corrected weight decay ours has, as Lamb has timm's).

The table-driven suites cover Lion through its reference class
(optim_configs.torch_class); these tests add the paper's rule in float64
over vector bodies and tails, and the package Lion users come from."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import fused_optim
from fused_optim import _reference
from harness import timm_optimizer

SIZES = [1, 7, 33, 1000, 4099]
STEPS = 12


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=g, dtype=torch.float64).to(dtype)) for n in SIZES]


def _grads(step, dtype):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) for n in SIZES]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    dict(lr=3e-3, betas=(0.5, 0.9), weight_decay=0.0, maximize=True),
], ids=["wd", "maximize"])
def test_matches_float64_reference(dtype, kwargs):
    # Ours in `dtype` against the reference rule in float64 from the same
    # start, every step, on params and exp_avg. Lion's update is lr * sign:
    # it moves every element by a multiple of lr, so an element differs
    # from float64 only where sign(c) flips under `dtype`'s rounding of c
    # (c within a rounding of 0), by 2 * lr a flip, or by `dtype`'s
    # rounding of the param itself.
    params = _params(dtype)
    ref = [p.detach().double().clone() for p in params]
    ref_state = [{"exp_avg": torch.zeros_like(r)} for r in ref]
    opt = fused_optim.Lion(params, **kwargs)
    exact = dtype in (torch.float32, torch.float64)
    for step in range(STEPS):
        grads = _grads(step, dtype)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for r, st, g in zip(ref, ref_state, grads):
            _reference.lion(r, g.double(), st, maximize=kwargs.get("maximize", False),
                            **{k: v for k, v in kwargs.items() if k != "maximize"})
        for p, r, st in zip(params, ref, ref_state):
            m = opt.state[p]["exp_avg"]
            assert m.dtype == dtype and set(opt.state[p]) == {"exp_avg"}
            if exact:
                tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else {}
                torch.testing.assert_close(p.detach().double(), r, **tol)
                torch.testing.assert_close(m.double(), st["exp_avg"], **tol)
            else:
                eps = torch.finfo(dtype).eps
                moved = (p.detach().double() - r).abs()
                # the params' own rounding (one per step), and at most a few
                # sign flips in any tensor
                bound = (step + 1) * eps * r.abs().max().item() + 2 * kwargs["lr"] * 3
                assert moved.max().item() <= bound, (dtype, step, moved.max().item(), bound)
                flips = (moved > (step + 1) * eps * r.abs().max().item()).float().mean().item()
                assert flips < 0.01, (dtype, step, flips)


def test_reference_is_the_papers_rule():
    # The reference itself against the paper's pseudocode, written out:
    # c = b1 m + (1 - b1) g; p -= lr (sign(c) + wd p); m = b2 m + (1 - b2) g.
    torch.manual_seed(0)
    p = torch.randn(1000, dtype=torch.float64)
    q = p.clone()
    m = torch.randn(1000, dtype=torch.float64)
    state = {"exp_avg": m.clone()}
    g = torch.randn(1000, dtype=torch.float64)
    lr, b1, b2, wd = 0.01, 0.9, 0.99, 0.1
    c = b1 * m + (1 - b1) * g
    expected = q - lr * (torch.sign(c) + wd * q)
    _reference.lion(p, g, state, lr=lr, betas=(b1, b2), weight_decay=wd, maximize=False)
    torch.testing.assert_close(p, expected)
    torch.testing.assert_close(state["exp_avg"], b2 * m + (1 - b2) * g)


def test_sign_of_zero_is_zero():
    # torch.sign(0) = 0: an element whose gradient and momentum are 0 does
    # not move (weight decay 0).
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    p.grad = torch.tensor([0.0, 1.0, -1.0])
    opt = fused_optim.Lion([p], lr=0.5)
    opt.step()
    assert p.tolist() == [1.0, -2.5, 3.5]
    assert opt.state[p]["exp_avg"].tolist() == pytest.approx([0.0, 0.01, -0.01])


def test_state_has_a_step_only_with_stochastic_rounding():
    a = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = fused_optim.Lion([{"params": [a]}, {"params": [b], "stochastic_rounding": True}], lr=1e-3)
    for _ in range(3):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
    assert set(opt.state[a]) == {"exp_avg"}
    assert set(opt.state[b]) == {"exp_avg", "step"} and opt.state[b]["step"].item() == 3


def _lion_pytorch():
    return pytest.importorskip("lion_pytorch", reason="lion-pytorch is not installed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    dict(lr=3e-3, betas=(0.5, 0.9)),
    dict(lr=1e-2, weight_decay=2e-3, use_triton=False, decoupled_weight_decay=True),
], ids=["wd", "no_wd", "decoupled_wd"])
def test_matches_lion_pytorch(dtype, kwargs):
    # lion-pytorch 0.2.5 (scripts/bootstrap.sh installs it, --no-deps):
    # the same trajectory, params and exp_avg, bit for bit in most elements,
    # over 12 steps, with two param groups.
    module = _lion_pytorch()
    ours_params, theirs_params = _params(dtype), _params(dtype)
    ours = fused_optim.Lion([{"params": ours_params[:3]}, {"params": ours_params[3:], "lr": 0.02}],
                            **kwargs)
    theirs = module.Lion([{"params": theirs_params[:3]}, {"params": theirs_params[3:], "lr": 0.02}],
                         **kwargs)
    for step in range(STEPS):
        for a, b, g in zip(ours_params, theirs_params, _grads(step, dtype)):
            a.grad, b.grad = g, g.clone()
        ours.step()
        theirs.step()
        for a, b in zip(ours_params, theirs_params):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"])


@pytest.mark.parametrize("decoupled", [False, True])
def test_checkpoints_move_between_lion_pytorch_and_ours(decoupled):
    # (lion-pytorch keeps decoupled_weight_decay on the optimizer, not in its
    # checkpoints: each side loads with its own)
    module = _lion_pytorch()
    ours_params, theirs_params = _params(torch.float32), _params(torch.float32)
    kwargs = dict(lr=1e-2, weight_decay=0.1 * (1e-2 if decoupled else 1.0),
                  decoupled_weight_decay=decoupled)
    ours = fused_optim.Lion(ours_params, **kwargs)
    theirs = module.Lion(theirs_params, **kwargs)
    for step in range(3):
        for a, b, g in zip(ours_params, theirs_params, _grads(step, torch.float32)):
            a.grad, b.grad = g, g.clone()
        ours.step()
        theirs.step()
    # theirs -> ours, and ours -> theirs, then both continue alike (copies:
    # a loaded state dict's tensors are taken as they are when they fit)
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert set(ours.state_dict()["state"][0]) == {"exp_avg"}
    for step in range(3, 6):
        for a, b, g in zip(ours_params, theirs_params, _grads(step, torch.float32)):
            a.grad, b.grad = g, g.clone()
        ours.step()
        theirs.step()
    for a, b in zip(ours_params, theirs_params):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"])


def _timm_lion():
    cls = timm_optimizer("lion", "Lion")
    if "corrected_weight_decay" not in inspect.signature(cls).parameters:
        pytest.skip("this timm's Lion has no corrected_weight_decay")
    return cls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_corrected_weight_decay_matches_timm(dtype):
    # timm's Lion (pinned by scripts/bootstrap.sh) with its corrected decay,
    # lr^2 / max_lr, max_lr the constructor's lr (0.03, above both groups'),
    # under a schedule: the same trajectory over 12 steps. (timm's moments
    # are lerps, lion-pytorch's and ours a multiply and an fma: the last
    # bits differ, not the signs.)
    timm_lion = _timm_lion()
    ours_params, theirs_params = _params(dtype), _params(dtype)

    def groups(params):
        return [{"params": params[:3], "lr": 0.01}, {"params": params[3:], "lr": 0.02}]

    kwargs = dict(lr=0.03, betas=(0.9, 0.99), weight_decay=0.5, corrected_weight_decay=True)
    ours, theirs = fused_optim.Lion(groups(ours_params), **kwargs), timm_lion(groups(theirs_params), **kwargs)
    schedules = [torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8) for opt in (ours, theirs)]
    plain_params = _params(dtype)
    plain = fused_optim.Lion(groups(plain_params), **{**kwargs, "corrected_weight_decay": False})
    schedules.append(torch.optim.lr_scheduler.ExponentialLR(plain, gamma=0.8))
    for step in range(STEPS):
        for a, b, c, g in zip(ours_params, theirs_params, plain_params, _grads(step, dtype)):
            a.grad, b.grad, c.grad = g, g.clone(), g.clone()
        for opt in (ours, theirs, plain):
            opt.step()
        for schedule in schedules:
            schedule.step()
        for a, b in zip(ours_params, theirs_params):
            torch.testing.assert_close(a, b)
            torch.testing.assert_close(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"])
    # (the correction moved the params: lr^2 / 0.03 is not lr)
    assert not torch.allclose(ours_params[4], plain_params[4])


@pytest.mark.parametrize("name", ["Lion", "Lamb"])
@pytest.mark.parametrize("saved", ["old_enabled", "old_disabled", "new"])
def test_corrected_weight_decay_in_checkpoints(name, saved):
    # As timm's: each group holds corrected_weight_decay and
    # max_lr_snapshot (the constructor's lr), saved and loaded as they are;
    # a checkpoint from before the options (lion-pytorch's, an older
    # timm's or ours) takes the loader's snapshot, and its flag as saved.
    cls = getattr(fused_optim, name)
    extra = {"decoupled_decay": True} if name == "Lamb" else {}
    p = torch.nn.Parameter(torch.randn(5))
    opt = cls([p], lr=2e-3, weight_decay=0.1, corrected_weight_decay=True, **extra)
    p.grad = torch.randn(5)
    opt.step()
    saved_dict = copy.deepcopy(opt.state_dict())
    assert saved_dict["param_groups"][0]["max_lr_snapshot"] == 2e-3
    if saved != "new":
        for group in saved_dict["param_groups"]:
            del group["max_lr_snapshot"]
            group["corrected_weight_decay"] = saved == "old_enabled"
    q = torch.nn.Parameter(torch.randn(5))
    resumed = cls([q], lr=1e-3, weight_decay=0.1, corrected_weight_decay=False, **extra)
    resumed.load_state_dict(saved_dict)
    group = resumed.param_groups[0]
    assert group["corrected_weight_decay"] is (saved != "old_disabled")
    assert group["max_lr_snapshot"] == (2e-3 if saved == "new" else 1e-3)


@pytest.mark.parametrize("name", ["Lion", "Lamb"])
def test_corrected_weight_decay_needs_a_positive_peak_lr(name):
    # timm's check (a zero lr is otherwise legal), in the constructor and,
    # for a group whose snapshot was set by hand, in the step, before it
    # writes anything.
    cls = getattr(fused_optim, name)
    p = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match="Corrected weight decay requires a positive max lr"):
        cls([p], lr=0.0, corrected_weight_decay=True)
    extra = {"decoupled_decay": True} if name == "Lamb" else {}
    opt = cls([p], lr=1e-2, weight_decay=0.1, corrected_weight_decay=True, **extra)
    opt.param_groups[0]["max_lr_snapshot"] = 0.0
    p.grad = torch.randn(5)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="got 0.0"):
        opt.step()
    assert torch.equal(p, before) and not opt.state[p]
