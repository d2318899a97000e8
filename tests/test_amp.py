"""AMP: torch.amp.GradScaler drives our optimizers as it drives torch.optim's.

Who divides the gradients by the scale follows torch's rule (Note [who
unscales under GradScaler], _base.py): an optimizer built with fused=True
(or, ours, with master_weights=True) has ``_step_supports_amp_scaling`` set,
so GradScaler hands ``grad_scale`` and ``found_inf`` to the step, whose
kernels unscale in registers, write the unscaled gradients back and skip the
step when an inf/NaN was found; any other lets GradScaler unscale in a pass
of its own and skip calling step(). Both paths run here. The reference is
torch.optim's single-tensor step driven by its own GradScaler: params,
state, step counters and the scale must follow the same trajectory (torch's
own fused Adam got this wrong for a while: pytorch#88258, #96755)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import fused_optim
from harness import assert_optimizer_unchanged, bits, snapshot_optimizer, unscaling_in_step
from optim_configs import HAS_FUSED, ONE_PER_OPTIMIZER, OPTIMIZER_NAMES, torch_class

SHAPES = [(1,), (7,), (9,), (4099,), (33, 65)]
# Steps whose gradients hold an inf or a NaN: the scaler halves its scale and
# the step is skipped. Two in a row, and one at the very first step (state
# made for a skipped step must behave like state made for the next one).
BAD_STEPS = {0: float("inf"), 3: float("nan"), 4: float("-inf"), 8: float("inf")}
STEPS = 11
IN_STEP = pytest.mark.parametrize("in_step", [True, False], ids=["unscaled_in_step", "by_the_scaler"])


def _grad(shape, step, index):
    g = torch.Generator().manual_seed(1000 * step + index)
    return torch.randn(shape, generator=g) + 0.5


class AmpRun:
    def __init__(self, cls, kwargs, unscale_first, dtype=torch.float32, in_step=False):
        cls, kwargs = unscaling_in_step(cls, kwargs, in_step)
        g = torch.Generator().manual_seed(7)
        self.params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]
        self.kwargs = kwargs
        self.opt = cls(self.params, **kwargs)
        assert getattr(self.opt, "_step_supports_amp_scaling", False) == in_step
        # growth_interval=2: the scale also grows during the run
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
        self.unscale_first = unscale_first

    def step(self, step):
        # (what scaler.scale(loss).backward() does to the gradients, with
        # gradients chosen here)
        self.scaler.scale(torch.ones(()))
        scale = self.scaler.get_scale()
        for i, p in enumerate(self.params):
            grad = _grad(p.shape, step, i) * scale  # a power of two: exact
            if step in BAD_STEPS and i == 2:
                grad.view(-1)[3] = BAD_STEPS[step]
            p.grad = grad.to(p.dtype)
        if self.unscale_first:
            self.scaler.unscale_(self.opt)  # e.g. for gradient clipping
        self.scaler.step(self.opt)
        self.scaler.update()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_who_unscales_follows_torch(name):
    """_step_supports_amp_scaling as torch.optim sets it for the same
    arguments (fused=True only), and for master_weights=True (float16
    params, whose gradients GradScaler refuses to unscale itself)."""
    cls = getattr(fused_optim, name)
    p = [torch.nn.Parameter(torch.randn(3))]
    cases = [({}, False), ({"master_weights": True}, True)]
    if name in HAS_FUSED:
        cases += [({"fused": True}, True), ({"fused": False}, False), ({"fused": None}, False),
                  ({"fused": True, "master_weights": True}, True)]
    for kwargs, expected in cases:
        assert cls(p, **kwargs)._step_supports_amp_scaling is expected, kwargs
        theirs = {k: v for k, v in kwargs.items() if k != "master_weights"}
        if name in HAS_FUSED and "master_weights" not in kwargs:
            assert getattr(torch_class(name)(p, **theirs), "_step_supports_amp_scaling", False) \
                is expected, kwargs
        # (a pickled or deep-copied optimizer has it: torch's Optimizer
        # pickles only defaults, state and param_groups, and torch's own
        # fused optimizers lose it there; ours makes it again)
        assert copy.deepcopy(cls(p, **kwargs))._step_supports_amp_scaling is expected, kwargs


def _run_against_manual_unscale(amp, plain):
    """Steps ``amp`` under its GradScaler, with the bad steps, and ``plain``
    (the same optimizer and params) without one, fed the unscaled gradients
    and skipping the bad steps: params and every state tensor must then be
    the same bits."""
    for step in range(STEPS):
        amp.step(step)
        if step in BAD_STEPS:
            continue
        for i, p in enumerate(plain.params):
            p.grad = _grad(p.shape, step, i).to(p.dtype)
        plain.opt.step()
    for p, q in zip(amp.params, plain.params):
        assert torch.equal(bits(p), bits(q))
        assert amp.opt.state[p].keys() == plain.opt.state[q].keys()
        for key, value in plain.opt.state[q].items():
            assert torch.equal(bits(amp.opt.state[p][key]), bits(value)), key


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_master_weights_in_a_group_unscales_in_step(name):
    """master_weights given to one group (not the constructor) counts too:
    its float16 gradients GradScaler would refuse to unscale. The flag is
    read from the groups, so a group added later counts; a group on torch.optim's
    path (fused=False) does not count."""
    cls = getattr(fused_optim, name)
    p, q = (torch.nn.Parameter(torch.randn(3)) for _ in range(2))
    assert cls([{"params": [p], "master_weights": True}, {"params": [q]}])._step_supports_amp_scaling
    opt = cls([p])
    assert not opt._step_supports_amp_scaling
    opt.add_param_group({"params": [q], "master_weights": True})
    assert opt._step_supports_amp_scaling
    assert copy.deepcopy(opt)._step_supports_amp_scaling
    # (load_state_dict keeps the loader's own precision options: Note
    # [implementation keywords on load])
    for mine in (None, True):
        loader = cls([{"params": [p]}, {"params": [q], "master_weights": mine}])
        loader.load_state_dict(opt.state_dict())
        assert loader._step_supports_amp_scaling is bool(mine)
    # set by hand (as code sets it on torch's optimizers), it is obeyed
    loader._step_supports_amp_scaling = False
    assert not loader._step_supports_amp_scaling
    if name in HAS_FUSED:
        # (refused when added, the pair can only be made by editing a group,
        # and the step refuses it: README, Bad input loses nothing)
        torch_path = cls([{"params": [p], "master_weights": True}, {"params": [q]}])
        torch_path.param_groups[0]["fused"] = False
        assert not torch_path._step_supports_amp_scaling


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_float16_group_with_master_weights_under_grad_scaler(cfg):
    """float16 params whose group has master_weights, beside a float32
    group, under GradScaler: the steps equal those of the same optimizer
    fed the unscaled gradients by hand, skipping the bad steps (GradScaler
    unscaling them itself would raise "Attempting to unscale FP16
    gradients")."""
    def build(run):
        half = [p for p in run.params[:2]]
        for p in half:
            p.data = p.data.half()
        return cfg.ours_cls([{"params": half, "master_weights": True},
                             {"params": run.params[2:]}], **cfg.kwargs)

    amp = AmpRun(cfg.ours_cls, cfg.kwargs, unscale_first=False)
    plain = AmpRun(cfg.ours_cls, cfg.kwargs, unscale_first=False)
    amp.opt, plain.opt = build(amp), build(plain)
    _run_against_manual_unscale(amp, plain)


def _compare(ours, ref, where):
    assert ours.scaler.get_scale() == ref.scaler.get_scale(), where
    for i, (p, r) in enumerate(zip(ours.params, ref.params)):
        assert_close(p, r, msg=lambda m: f"{where} param {i}: {m}")
        st, rt = ours.opt.state.get(p, {}), ref.opt.state.get(r, {})
        # (no state from a skipped first step: Note [a step AMP skips makes no state])
        assert st.keys() == rt.keys(), f"{where} param {i}: state {sorted(st)} vs {sorted(rt)}"
        for key, value in rt.items():
            if key == "step":
                # torch never saw the skipped steps; ours skipped them
                assert float(st[key]) == float(value), f"{where} param {i} step"
            else:
                assert_close(st[key], value, msg=lambda m: f"{where} {key}[{i}]: {m}")


@IN_STEP
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler_step", "unscale_then_step"])
@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_grad_scaler_matches_torch(cfg, unscale_first, in_step):
    ours = AmpRun(cfg.ours_cls, cfg.kwargs, unscale_first, in_step=in_step)
    ref = AmpRun(cfg.torch_cls, {**cfg.kwargs, "foreach": False}, unscale_first)
    for step in range(STEPS):
        ours.step(step)
        ref.step(step)
        _compare(ours, ref, f"{cfg} step {step}")
        # The gradients the optimizer saw, written back unscaled; on a
        # skipped step the scaler's own pass has unscaled them, the step's
        # (not run) has not: Note [who unscales under GradScaler].
        if step not in BAD_STEPS or not in_step or unscale_first:
            for i, (p, r) in enumerate(zip(ours.params, ref.params)):
                assert torch.equal(bits(p.grad), bits(r.grad)), f"{cfg} step {step}: grad {i}"


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_skipped_step_writes_nothing(cfg):
    """A step that unscales in the step, with found_inf set, leaves params,
    state, step counters and (scaled) grads exactly as they were."""
    ours = AmpRun(cfg.ours_cls, cfg.kwargs, unscale_first=False, in_step=True)
    for step in range(2):
        ours.step(step + 1)  # (step 0 is a bad one)
    snap = snapshot_optimizer(ours.opt)
    ours.scaler.scale(torch.ones(()))
    for i, p in enumerate(ours.params):
        p.grad = _grad(p.shape, 5, i) * 64
    ours.params[1].grad[0] = float("nan")
    grads = [p.grad.clone() for p in ours.params]
    ours.scaler.step(ours.opt)
    assert_optimizer_unchanged(ours.opt, snap, f"{cfg} skipped step")
    for p, g in zip(ours.params, grads):
        assert torch.equal(bits(p.grad), bits(g)), "a skipped step must not write the grads"


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_grad_scaler_with_master_weights_equals_manual_unscale(cfg):
    """bf16 params with master weights under AMP take the same steps as
    without AMP, fed the unscaled gradients and skipping the bad steps."""
    kwargs = {**cfg.kwargs, "master_weights": True}
    amp = AmpRun(cfg.ours_cls, kwargs, unscale_first=False, dtype=torch.bfloat16, in_step=True)
    plain = AmpRun(cfg.ours_cls, kwargs, unscale_first=False, dtype=torch.bfloat16, in_step=True)
    _run_against_manual_unscale(amp, plain)


def _checkpoint_round_trip(run):
    saved = run.opt.state_dict()
    run.opt = type(run.opt)(run.params, **run.kwargs)
    run.opt.load_state_dict(saved)


def _add_param_group(run):
    run.opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})


def _step_without_gradients(run):
    for p in run.params:
        p.grad = None
    run.opt.step()


BETWEEN = {"nothing": lambda run: None, "checkpoint_round_trip": _checkpoint_round_trip,
           "add_param_group": _add_param_group, "step_without_gradients": _step_without_gradients}


@pytest.mark.parametrize("between", sorted(BETWEEN))
@pytest.mark.parametrize("name", ["SGD", "Lars"])
def test_a_first_step_skipped_by_amp_makes_no_state(name, between):
    """SGD's (and Lars's) first momentum step takes the gradient as the
    buffer (with dampening it differs from momentum * 0 + (1 - dampening) *
    g). A first step skipped by AMP makes no state (Note [a step AMP skips
    makes no state]), as torch.optim's, whose step() a skipped step never
    calls: whatever happens before the next step (a checkpoint, a new
    group, a step without gradients), it starts the buffer."""
    kwargs = dict(lr=0.1, momentum=0.9, dampening=0.5)
    ours = AmpRun(getattr(fused_optim, name), kwargs, unscale_first=False, in_step=True)
    ref = AmpRun(torch_class(name), {**kwargs, "foreach": False}, unscale_first=False)
    for run in (ours, ref):
        run.step(0)  # a bad step
    assert not ours.opt.state and not ours.opt.state_dict()["state"]
    for run in (ours, ref):
        BETWEEN[between](run)
    for step in range(1, 3):
        ours.step(step)
        ref.step(step)
        _compare(ours, ref, f"{between}, step {step}")


def test_op_rejects_bad_grad_scale_before_writing():
    p, g = torch.randn(5), torch.randn(5)
    m, v = torch.zeros(5), torch.zeros(5)
    step = torch.tensor(0.0)
    before = [t.clone() for t in (p, g, m, v, step)]
    for bad, match in ((torch.tensor([2.0], dtype=torch.float64), "grad_scale must be float32"),
                       (torch.tensor([2.0, 4.0]), "grad_scale must be a one-element")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fused_optim.adam_(
                params=[p], grads=[g], exp_avgs=[m], exp_avg_sqs=[v], max_exp_avg_sqs=[],
                master_params=[], state_steps=[step], group_index=[0], lr=[1e-3], beta1=[0.9],
                beta2=[0.999], eps=[1e-8], weight_decay=[0.0], maximize=[False],
                decoupled_weight_decay=[False], max_grad_norm=[float("inf")], grad_scale=bad,
                found_inf=None, grad_norm=None, amsgrad=False,
                stochastic_rounding=False)
    for t, t0 in zip((p, g, m, v, step), before):
        assert torch.equal(t, t0)
