"""Clipping by the global gradient norm (fused_optim/_clip.py).

- ``max_grad_norm`` on every optimizer: the reference is torch's recipe,
  the total norm over ALL the optimizer's gradients
  (``torch.nn.utils.get_total_norm``), each gradient of a clipped group
  multiplied by ``clamp(max_grad_norm / (norm + 1e-6), max=1)`` (torch's
  ``clip_grad_norm_`` formula), then torch.optim's single-tensor step;
  compared on the params AND every state tensor after every step. The
  norms are summed in another order than torch's, so fp32 is compared
  with a tolerance (fp64 tightly), and bit-exactness is asked only where
  the math makes it exact (a factor of exactly 1, eager vs compiled).
- ``fused_optim.clip_grad_norm_`` against ``torch.nn.utils.clip_grad_norm_``.
- ``torch.ops.fused_optim.sum_of_squares`` against float64 references.
"""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch.testing import assert_close

import fused_optim
from fused_optim import _C
from harness import (
    P,
    Run,
    always,
    assert_optimizer_unchanged,
    assert_same_state,
    bits,
    snapshot_optimizer,
    snapshot_params,
    torch_clip_,
    sometimes_none,
    step_device_of,
    unscaling_in_step,
)
from optim_configs import (
    CONFIGS_BY_ID, GROUP_OVERRIDES, HAS_FUSED, ONE_PER_OPTIMIZER, OPTIMIZER_NAMES,
    SAVED_GROUP_EXTRAS, torch_class,
)

STEPS = 12
CLIP_NAMES = tuple(OPTIMIZER_NAMES)
CLIP_ONE_PER_OPTIMIZER = [c for c in ONE_PER_OPTIMIZER if c.name in CLIP_NAMES]
assert sorted(c.name for c in CLIP_ONE_PER_OPTIMIZER) == sorted(CLIP_NAMES)
EXACT = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
ONE_EACH = pytest.mark.parametrize("cfg", CLIP_ONE_PER_OPTIMIZER, ids=str)
# ONE_PER_OPTIMIZER plus the plain configs (no momentum / weight decay hides
# nothing of the clipping factor there), the latter with clipping active.
EXTRA_CLIP_CONFIGS = [
    CONFIGS_BY_ID[i]
    for i in ("sgd", "sgd_momentum_dampening_wd", "adagrad", "rmsprop_centered", "adam", "adamw")
]

# Sizes that hit the vector bodies and the tails, and non-contiguous grads.
SPECS = [
    P((1,)),
    P((7,)),
    P((33,)),
    P((4099,)),
    P((33, 65), grad_layout="transposed"),
    P((1001,), grad_layout="strided"),
]
# The gradients of SPECS (harness.make_grad: |g| in [0.25, ~2], scaled down
# on its QUIET_STEPS) have a total norm of ~90, ~4.5 and ~9 on the quiet
# steps: 0.5 clips every step, 20 every step but the quiet ones, 1e4 none.
MAX_NORMS = {"always": 0.5, "sometimes": 20.0, "never": 1e4}

# Cross-implementation tolerances (the norm is summed in another order than
# torch's, and the factor computed in another precision: it differs in its
# last bits). atol is relative to the largest magnitude of the compared
# tensor: the clipped states are small (exp_avg_sq ~ 1e-5 when clipping to
# 0.5), and an element where a clipped gradient nearly cancels weight decay
# has an error of a few ulps of the tensor's scale, not of its own value.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float64: dict(rtol=1e-11, atol=1e-11),
}


def assert_close_scaled(actual, expected, dtype, msg):
    """assert_close with TOL[dtype], atol scaled by max|expected| when that
    is below 1."""
    tol = TOL[dtype]
    scale = expected.detach().abs().max().item() if expected.numel() else 1.0
    scale = min(max(scale, 1e-30), 1.0) if math.isfinite(scale) else 1.0
    assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=msg)
NORM_TOL = {
    torch.float32: dict(rtol=2e-6, atol=0.0),
    torch.float64: dict(rtol=1e-13, atol=0.0),
}


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


def norm64(tensors) -> torch.Tensor:
    """The L2 norm of ``tensors`` as one vector, in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for t in tensors:
        if t.is_complex():
            t = torch.view_as_real(t)
        total += t.double().square().sum()
    return total.sqrt()


def assert_close_runs(ours: Run, ref: Run, where: str, dtype):
    """Params and every state tensor within TOL[dtype]; state names, step
    counters, dtypes, shapes and devices as torch's."""
    for i, (po, pr) in enumerate(zip(ours.params, ref.params)):
        w = f"{where} param {i} {ours.specs[i]}"
        assert_close_scaled(po.detach(), pr.detach(), dtype, msg=lambda m: f"{w}: {m}")
        so, sr = ours.state_of(i), ref.state_of(i)
        assert_same_state(so, sr, w, close=False, step_device=step_device_of(po))
        for key, value in sr.items():
            if key != "step":
                assert_close_scaled(so[key], value, dtype, msg=lambda m: f"{w} state[{key!r}]: {m}")


def assert_equal_runs(a: Run, b: Run, where: str):
    """Bit-identical params and state."""
    for i, (pa, pb) in enumerate(zip(a.params, b.params)):
        assert torch.equal(bits(pa), bits(pb)), f"{where}: param {i} differs"
        sa, sb = a.state_of(i), b.state_of(i)
        assert set(sa) == set(sb), f"{where}: state keys of param {i}"
        for key in sa:
            assert torch.equal(bits(sa[key]), bits(sb[key])), f"{where}: state[{key!r}] of param {i}"


def grad_bits(run: Run):
    return [None if p.grad is None else bits(p.grad) for p in run.params]


def assert_grads_unwritten(params, before, where):
    for i, (p, b) in enumerate(zip(params, before)):
        if b is None:
            assert p.grad is None, f"{where}: grad {i} appeared"
        else:
            assert torch.equal(bits(p.grad), b), f"{where}: the step wrote grad {i}"


def _kwargs(cfg) -> dict:
    """The config's kwargs with clipping off unless a test asks for it: for
    ours and for a reference class that clips by itself by default (timm's
    Lamb, max_grad_norm=1.0), which torch_clip_ clips for here."""
    kw = dict(cfg.kwargs)
    if "max_grad_norm" in inspect.signature(cfg.torch_cls).parameters:
        kw["max_grad_norm"] = None
    return kw


def _strip(groups):
    return [({k: v for k, v in o.items() if k != "max_grad_norm"}, specs) for o, specs in groups]


def run_clip_parity(cfg, groups, max_grad_norm, *, dtype=torch.float32, has_grad=always,
                    steps=STEPS, extra=None, grads_written=False):
    """ours (``max_grad_norm`` as the default, per-group values in the
    groups' overrides) against torch_clip_ + torch.optim (foreach=False) in
    lockstep; params, state and grad_norm compared after every step, and the
    gradients left unwritten by our step (unless ``grads_written``: then
    equal to torch's clipped ones). Returns (ref, ours, torch's norms)."""
    kw = dict(_kwargs(cfg))
    ref = Run(cfg.torch_cls, _strip(groups), {**kw, "foreach": False}, dtype=dtype)
    ours = Run(cfg.ours_cls, groups, {**kw, **(extra or {}), "max_grad_norm": max_grad_norm},
               dtype=dtype)
    maxes = [o.get("max_grad_norm", max_grad_norm) for o, _ in groups]
    assert ours.opt.grad_norm is None
    initial = snapshot_params(ours)
    norms = []
    for s in range(steps):
        ref.set_grads(s, has_grad)
        ours.set_grads(s, has_grad)
        before = grad_bits(ours)
        norm = torch_clip_(ref.opt, maxes)
        ref.opt.step()
        ours.opt.step()
        where = f"{cfg} {dtype} max_grad_norm={max_grad_norm} step {s}"
        got = ours.opt.grad_norm
        assert isinstance(got, torch.Tensor) and got.dim() == 0, f"{where}: grad_norm {got!r}"
        assert got.dtype == norm.dtype, f"{where}: grad_norm dtype {got.dtype} != {norm.dtype}"
        assert_close(got, norm, **NORM_TOL[dtype], msg=lambda m: f"{where} grad_norm: {m}")
        assert_close_runs(ours, ref, where, dtype)
        if grads_written:
            for i, (p, r) in enumerate(zip(ours.params, ref.params)):
                if r.grad is not None:
                    assert_close(p.grad, r.grad, **TOL[dtype], msg=lambda m: f"{where} grad {i}: {m}")
        else:
            assert_grads_unwritten(ours.params, before, where)
        norms.append(norm.item())
    for i, (p, p0) in enumerate(zip(ours.params, initial)):
        if any(has_grad(s, i) for s in range(steps)):
            assert not torch.equal(p.detach(), p0), f"{cfg}: param {i} did not move"
    return ref, ours, norms


# ---------------------------------------------------------------------------
# 1. Every optimizer against torch's clip + step
# ---------------------------------------------------------------------------


@EXACT
@pytest.mark.parametrize(
    "cfg,level",
    [(c, level) for c in CLIP_ONE_PER_OPTIMIZER for level in MAX_NORMS]
    + [(c, level) for c in EXTRA_CLIP_CONFIGS for level in ("always", "sometimes")],
    ids=str,
)
def test_max_grad_norm_matches_torch_clip_then_step(cfg, level, dtype):
    max_norm = MAX_NORMS[level]
    ref, ours, norms = run_clip_parity(cfg, [({}, SPECS)], max_norm, dtype=dtype)
    # The case is what its name says (the norms are torch's).
    clipped = [n > max_norm for n in norms]
    assert {"always": all(clipped), "never": not any(clipped),
            "sometimes": any(clipped) and not all(clipped)}[level], (level, norms)
    if level == "never":
        # A factor of exactly 1: the same bits as an unclipped run of ours.
        plain = Run(cfg.ours_cls, [({}, SPECS)], _kwargs(cfg), dtype=dtype)
        for s in range(STEPS):
            plain.set_grads(s)
            plain.opt.step()
        assert_equal_runs(ours, plain, f"{cfg} never clipped vs unclipped")


@ONE_EACH
def test_max_grad_norm_with_none_grads_and_lazy_state(cfg):
    # Param 1 gets its first grad at step 3, param 2 has none at steps 4
    # and 7, param 3 never has one: the norm spans the present grads only.
    specs = [P((9,)), P((3, 4)), P((8,)), P((5,)), P((4099,))]
    run_clip_parity(cfg, [({}, specs)], 5.0, has_grad=sometimes_none)


# ---------------------------------------------------------------------------
# 2. Per-group max_grad_norm (None, inf, finite) in one optimizer
# ---------------------------------------------------------------------------


def _per_group(cfg, first, default_is_none):
    o1, o2 = GROUP_OVERRIDES[cfg.name]
    first_group = {} if default_is_none else {"max_grad_norm": None}
    return [
        (first_group, [P((7,)), P((4099,))]),  # not clipped (counts in the norm)
        ({"max_grad_norm": math.inf}, [P((33,))]),  # measured, not clipped
        ({"max_grad_norm": first, **o1}, [P((1,)), P((9, 17), grad_layout="transposed")]),
        ({"max_grad_norm": 20.0, **o2}, [P((1001,), grad_layout="strided")]),
    ]


@EXACT
@ONE_EACH
def test_per_group_max_grad_norm(cfg, dtype):
    # Default None: group 0 has no key of its own.
    run_clip_parity(cfg, _per_group(cfg, 0.5, True), None, dtype=dtype)
    # Default 2.0, group 0 opts out with an explicit None, group 1 measures.
    groups = _per_group(cfg, 0.5, False) + [({}, [P((65,))])]  # the default (2.0)
    run_clip_parity(cfg, groups, 2.0, dtype=dtype)


@ONE_EACH
def test_per_group_max_grad_norm_mixed_dtypes(cfg):
    # fp32 and fp64 params in one optimizer (several calls, the step's
    # general path): one norm over both, float64 (torch's total norm of
    # mixed dtypes is float64 too).
    groups = [
        ({}, [P((7,)), P((33,), dtype=torch.float64)]),
        ({"max_grad_norm": 0.5}, [P((4099,)), P((9,), dtype=torch.float64)]),
    ]
    run_clip_parity(cfg, groups, None)


def test_group_max_grad_norm_changed_mid_run():
    # Read at every step, like lr: set, changed, removed (None), set again.
    cfg = CONFIGS_BY_ID["adam_wd_amsgrad"]
    schedule = {0: 0.5, 3: 20.0, 6: None, 9: 1.0}
    ref = Run(cfg.torch_cls, [({}, SPECS)], {**_kwargs(cfg), "foreach": False})
    ours = Run(cfg.ours_cls, [({}, SPECS)], _kwargs(cfg))
    max_norm = None
    for s in range(STEPS):
        if s in schedule:
            max_norm = ours.opt.param_groups[0]["max_grad_norm"] = schedule[s]
        ref.set_grads(s)
        ours.set_grads(s)
        torch_clip_(ref.opt, [max_norm])
        ref.opt.step()
        last = ours.opt.grad_norm
        ours.opt.step()
        if max_norm is None:
            assert ours.opt.grad_norm is last, "an unclipped step must keep the last norm"
        assert_close_runs(ours, ref, f"step {s}", torch.float32)


def test_infinite_norm_clips_finite_groups_to_zero_and_leaves_the_others():
    # A non-finite norm (no AMP): inf / (inf + 1e-6) = 0 for a finite max,
    # as torch's factor; unclipped (None) and measured (inf) groups take
    # their gradients as they are.
    params = [torch.full((9,), 1.0, requires_grad=True) for _ in range(3)]
    opt = fused_optim.SGD([{"params": [params[0]]},
                           {"params": [params[1]], "max_grad_norm": math.inf},
                           {"params": [params[2]], "max_grad_norm": 1.0}], lr=0.1)
    for p in params:
        p.grad = torch.full((9,), 2.0)
    params[0].grad[4] = math.inf
    opt.step()
    assert opt.grad_norm.item() == math.inf
    expected = torch.full((9,), 0.8)
    expected0 = expected.clone()
    expected0[4] = -math.inf
    assert torch.equal(params[0].detach(), expected0)
    assert torch.equal(params[1].detach(), expected)
    assert torch.equal(params[2].detach(), torch.full((9,), 1.0))


# ---------------------------------------------------------------------------
# 3. grad_norm, and inf: measured without changing the trajectory
# ---------------------------------------------------------------------------


@EXACT
@ONE_EACH
def test_inf_measures_the_norm_without_clipping(cfg, dtype):
    groups = [({}, SPECS[:4]), (GROUP_OVERRIDES[cfg.name][0], SPECS[4:])]
    measured = Run(cfg.ours_cls, groups, {**_kwargs(cfg), "max_grad_norm": math.inf}, dtype=dtype)
    plain = Run(cfg.ours_cls, groups, _kwargs(cfg), dtype=dtype)
    ref = Run(cfg.torch_cls, groups, {**_kwargs(cfg), "foreach": False}, dtype=dtype)
    for s in range(STEPS):
        for r in (measured, plain, ref):
            r.set_grads(s)
        want = torch.nn.utils.get_total_norm([p.grad for p in ref.params], foreach=False)
        for r in (measured, plain, ref):
            r.opt.step()
        assert plain.opt.grad_norm is None, "no max_grad_norm: no norm measured"
        got = measured.opt.grad_norm
        assert got.dtype == dtype and got.shape == ()
        assert_close(got, want, **NORM_TOL[dtype])
        assert_equal_runs(measured, plain, f"{cfg} {dtype} step {s}: inf vs unclipped")
    assert_close_runs(measured, ref, f"{cfg} {dtype}", dtype)


# ---------------------------------------------------------------------------
# 4. The step does not write the gradients (no AMP)
# ---------------------------------------------------------------------------


@ONE_EACH
@pytest.mark.parametrize("path", ["one_call", "several_calls"])
def test_step_does_not_write_gradients(cfg, path):
    specs = list(SPECS)
    if path == "several_calls":
        specs += [P((17,), dtype=torch.float64)]  # a second bucket
    run = Run(cfg.ours_cls, [({}, specs[:3]), ({"max_grad_norm": None}, specs[3:])],
              {**_kwargs(cfg), "max_grad_norm": 0.5})
    for s in range(3):
        run.set_grads(s)
        before = grad_bits(run)
        ptrs = [p.grad.data_ptr() for p in run.params]
        run.opt.step()
        assert_grads_unwritten(run.params, before, f"{cfg} {path} step {s}")
        assert [p.grad.data_ptr() for p in run.params] == ptrs
        assert run.opt.grad_norm > 0.5  # (clipping was active)


# ---------------------------------------------------------------------------
# 5. AMP (torch.amp.GradScaler on the CPU, as tests/test_amp.py)
# ---------------------------------------------------------------------------

AMP_SHAPES = [(1,), (7,), (33,), (4099,), (33, 65)]
AMP_BAD_STEPS = {0: math.inf, 3: math.nan, 4: -math.inf, 8: math.inf}
AMP_MAX_NORM = 5.0  # clips every good step (norms ~ 95)


def _amp_grad(shape, step, index):
    g = torch.Generator().manual_seed(1000 * step + index)
    return torch.randn(shape, generator=g) + 0.5


class AmpRun:
    def __init__(self, cls, kwargs, dtype=torch.float32, in_step=False):
        cls, kwargs = unscaling_in_step(cls, kwargs, in_step)
        g = torch.Generator().manual_seed(7)
        self.params = [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in AMP_SHAPES]
        self.opt = cls(self.params, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)

    def set_grads(self, step):
        """The gradients scaler.scale(loss).backward() would make (a power
        of two times the unscaled ones: exact); returns the unscaled ones."""
        self.scaler.scale(torch.ones(()))
        scale = self.scaler.get_scale()
        unscaled = []
        for i, p in enumerate(self.params):
            grad = _amp_grad(p.shape, step, i)
            if step in AMP_BAD_STEPS and i == 2:
                grad.view(-1)[3] = AMP_BAD_STEPS[step]
            unscaled.append(grad)
            p.grad = (grad * scale).to(p.dtype)
        return unscaled


@ONE_EACH
@pytest.mark.parametrize("in_step", [True, False], ids=["unscaled_in_step", "by_the_scaler"])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler_step", "unscale_then_step"])
def test_grad_scaler_with_max_grad_norm_matches_torch(cfg, unscale_first, in_step):
    ours = AmpRun(cfg.ours_cls, {**_kwargs(cfg), "max_grad_norm": AMP_MAX_NORM}, in_step=in_step)
    ref = AmpRun(cfg.torch_cls, {**_kwargs(cfg), "foreach": False})
    for step in range(11):
        unscaled = ours.set_grads(step)
        ref.set_grads(step)
        where = f"{cfg} step {step}"
        # torch's recipe: unscale, clip (clip_grad_norm_'s factor, as
        # torch_clip_), step (skipped on inf/NaN), update.
        ref.scaler.unscale_(ref.opt)
        want = torch_clip_(ref.opt, [AMP_MAX_NORM])
        ref.scaler.step(ref.opt)
        ref.scaler.update()
        snap, snap_norm = snapshot_optimizer(ours.opt), ours.opt.grad_norm
        if unscale_first:
            ours.scaler.unscale_(ours.opt)
        ours.scaler.step(ours.opt)
        ours.scaler.update()
        assert ours.scaler.get_scale() == ref.scaler.get_scale(), where
        got = ours.opt.grad_norm
        if step in AMP_BAD_STEPS:
            # A step that unscales measures the inf; one the scaler skips is
            # not called and keeps the last norm.
            if in_step:
                assert not torch.isfinite(got), f"{where}: a skipped step's grad_norm is {got}"
            else:
                assert got is snap_norm, f"{where}: a step not called measured {got}"
            # (a first step makes the state, with step counters at 0)
            assert_optimizer_unchanged(ours.opt, snap, f"{where} (skipped)", allow_new_state=True)
            for i, (p, r) in enumerate(zip(ours.params, ref.params)):
                if "step" in ours.opt.state.get(p, {}):
                    want_step = float(ref.opt.state[r]["step"]) if r in ref.opt.state else 0.0
                    assert float(ours.opt.state[p]["step"]) == want_step, f"{where} param {i} step"
            continue
        assert want > AMP_MAX_NORM  # (clipping was active)
        assert_close(got, want, **NORM_TOL[torch.float32], msg=lambda m: f"{where} grad_norm: {m}")
        for i, (p, r) in enumerate(zip(ours.params, ref.params)):
            assert_close_scaled(p, r, torch.float32, msg=lambda m: f"{where} param {i}: {m}")
            st, rt = ours.opt.state.get(p, {}), ref.opt.state.get(r, {})
            assert set(st) == set(rt), where
            for key, value in rt.items():
                if key == "step":  # torch never saw the skipped steps
                    assert float(st[key]) == float(value), f"{where} param {i} step"
                else:
                    assert_close_scaled(st[key], value, torch.float32,
                                        msg=lambda m: f"{where} {key}[{i}]: {m}")
            # Written back unscaled, never clipped (the scale is a power of two).
            assert torch.equal(p.grad, unscaled[i]), f"{where}: grad {i}"


@ONE_EACH
def test_grad_scaler_skipped_step_with_max_grad_norm_writes_nothing(cfg):
    ours = AmpRun(cfg.ours_cls, {**_kwargs(cfg), "max_grad_norm": AMP_MAX_NORM}, in_step=True)
    for step in (1, 2):
        ours.set_grads(step)
        ours.scaler.step(ours.opt)
        ours.scaler.update()
    good_norm = ours.opt.grad_norm.clone()
    assert torch.isfinite(good_norm)
    snap = snapshot_optimizer(ours.opt)
    ours.set_grads(8)  # an inf in grad 2
    grads = [bits(p.grad) for p in ours.params]
    ours.scaler.step(ours.opt)
    assert_optimizer_unchanged(ours.opt, snap, f"{cfg} skipped step")
    for p, g in zip(ours.params, grads):
        assert torch.equal(bits(p.grad), g), "a skipped step must not write the grads"
    assert not torch.isfinite(ours.opt.grad_norm)
    steps = {float(st["step"]) for st in ours.opt.state.values() if "step" in st}
    assert steps in (set(), {2.0}), steps


# ---------------------------------------------------------------------------
# 6. fused=False: torch's step on clipped gradients
# ---------------------------------------------------------------------------

UNFUSED_CONFIGS = [c for c in CLIP_ONE_PER_OPTIMIZER if c.name in HAS_FUSED]


@pytest.mark.parametrize("cfg", UNFUSED_CONFIGS, ids=str)
@EXACT
def test_unfused_max_grad_norm_matches_torch(cfg, dtype):
    groups = [({}, SPECS[:4]), ({"max_grad_norm": None}, SPECS[4:5]),
              ({"max_grad_norm": 20.0}, SPECS[5:])]
    # torch's code reads gradients from .grad only: clipped ones are
    # written, as torch's clip_grad_norm_ writes them.
    run_clip_parity(cfg, groups, 0.5, dtype=dtype, extra={"fused": False}, grads_written=True)


@pytest.mark.parametrize("cfg", UNFUSED_CONFIGS, ids=str)
def test_fused_and_unfused_groups_share_one_norm(cfg):
    groups = [({"max_grad_norm": 0.5}, SPECS[:4]), ({"fused": False, "max_grad_norm": 20.0}, SPECS[4:])]
    kw = dict(_kwargs(cfg))
    ref = Run(cfg.torch_cls, _strip(groups), {**kw, "foreach": False})
    ours = Run(cfg.ours_cls, groups, kw)
    for s in range(6):
        ref.set_grads(s)
        ours.set_grads(s)
        before = grad_bits(ours)
        norm = torch_clip_(ref.opt, [0.5, 20.0])
        ref.opt.step()
        ours.opt.step()
        assert_close(ours.opt.grad_norm, norm, **NORM_TOL[torch.float32])
        assert_close_runs(ours, ref, f"{cfg} step {s}", torch.float32)
        # the fused group's gradients are not written
        assert_grads_unwritten(ours.params[:4], before[:4], f"{cfg} step {s}")


# ---------------------------------------------------------------------------
# 7. torch.compile
# ---------------------------------------------------------------------------


def _compile_params():
    torch.manual_seed(0)
    return [torch.randn(s, requires_grad=True) for s in ((7,), (33,), (4099,), (5, 3))]


def _compiled_and_eager(name):
    """Two twin optimizers (tensor lr, groups clipped / unclipped /
    measured) and opts[0].step compiled with aot_eager."""
    torch._dynamo.reset()
    kwargs = dict(lr=torch.tensor(0.01), max_grad_norm=2.0)
    if name == "SGD":
        kwargs["momentum"] = 0.9
    params = [_compile_params(), _compile_params()]
    opts = [getattr(fused_optim, name)(
        [{"params": ps[:2]}, {"params": ps[2:3], "max_grad_norm": None},
         {"params": ps[3:], "max_grad_norm": math.inf}], **copy.deepcopy(kwargs))
        for ps in params]
    return params, opts, torch.compile(opts[0].step, backend="aot_eager")


def _set_twin_grads(params, step):
    for i, (p, q) in enumerate(zip(*params)):
        torch.manual_seed(10 * step + i)
        p.grad = torch.randn_like(p) * (1 + step)
        q.grad = p.grad.clone()


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_compiled_step_with_max_grad_norm_equals_eager(name):
    params, opts, compiled = _compiled_and_eager(name)
    for step in range(4):
        _set_twin_grads(params, step)
        compiled()
        opts[1].step()
        assert opts[1].grad_norm > 2.0  # (clipping was active)
        for p, q in zip(*params):
            assert torch.equal(p, q), f"{name} step {step}"
            st, sq = opts[0].state[p], opts[1].state[q]
            assert set(st) == set(sq)
            for key in st:
                assert torch.equal(st[key], sq[key]), f"{name} step {step} state[{key}]"
    # (and the clipping is in it: an unclipped eager run differs)
    plain = _compile_params()
    opt = getattr(fused_optim, name)(plain, lr=0.01, momentum=0.9) if name == "SGD" else \
        fused_optim.Adam(plain, lr=0.01)
    for step in range(4):
        for i, p in enumerate(plain):
            torch.manual_seed(10 * step + i)
            p.grad = torch.randn_like(p) * (1 + step)
        opt.step()
    assert not torch.equal(plain[0], params[0][0])


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_compiled_step_sets_grad_norm(name):
    # grad_norm is the norm of the last step, compiled or not.
    params, opts, compiled = _compiled_and_eager(name)
    for step in range(3):
        _set_twin_grads(params, step)
        compiled()
        opts[1].step()
        assert opts[0].grad_norm is not None, f"{name} step {step}: grad_norm not set"
        assert torch.equal(opts[0].grad_norm, opts[1].grad_norm), f"{name} step {step}"


def test_traced_step_computes_the_norm_with_the_public_op():
    torch._dynamo.reset()
    params = _compile_params()
    opt = fused_optim.AdamW(params, lr=torch.tensor(0.01), max_grad_norm=1.0)
    for p in params:
        p.grad = torch.randn_like(p)
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0, explained.break_reasons
    code = "\n".join(g.code for g in explained.graphs)
    assert "fused_optim.sum_of_squares" in code
    assert "fused_optim.adam_" in code


def _clip_in_halves(params, max_norm):
    norm = fused_optim.get_total_norm([p.grad for p in params if p.grad is not None])
    fused_optim.clip_grads_with_norm_(params, max_norm, norm)
    return norm


@pytest.mark.parametrize("clip", [fused_optim.clip_grad_norm_, _clip_in_halves],
                         ids=["clip_grad_norm_", "get_total_norm+clip_grads_with_norm_"])
def test_clip_functions_compile_whole_and_equal_eager(clip):
    # In a compiled train step the clip is traced (the public op), with no
    # graph break (fullgraph=True), and gives the eager bits.
    torch._dynamo.reset()
    params = [_compile_params(), _compile_params()]
    _set_twin_grads(params, 1)
    compiled = torch.compile(lambda ps: clip(ps, 0.5), fullgraph=True, backend="aot_eager")
    got = compiled(params[0])
    want = clip(params[1], 0.5)
    assert want > 0.5 and torch.equal(got, want)
    for p, q in zip(*params):
        assert torch.equal(bits(p.grad), bits(q.grad))
    explained = torch._dynamo.explain(lambda ps: clip(ps, 0.5))(params[0])
    assert "fused_optim.sum_of_squares" in "\n".join(g.code for g in explained.graphs)


# ---------------------------------------------------------------------------
# 8. state_dict
# ---------------------------------------------------------------------------


def _params(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7 + i, generator=g).requires_grad_() for i in range(n)]


def _set_grads(params, step):
    for i, p in enumerate(params):
        g = torch.Generator().manual_seed(100 * step + i)
        p.grad = torch.randn(p.shape, generator=g) * 5


@pytest.mark.parametrize("name", CLIP_NAMES)
def test_state_dict_has_max_grad_norm_only_when_set(name):
    # Note [our options in param groups]: a group has the key when it is set
    # (by the constructor or in the group), and state_dict() mirrors the
    # live groups, as torch.optim's does.
    ps = _params(n=4)
    opt = getattr(fused_optim, name)(
        [{"params": ps[:1]}, {"params": ps[1:2], "max_grad_norm": 1.5},
         {"params": ps[2:3], "max_grad_norm": math.inf}, {"params": ps[3:], "max_grad_norm": None}],
        lr=0.01)
    _set_grads(ps, 0)
    opt.step()
    groups = opt.state_dict()["param_groups"]
    # The rest of the keys are torch.optim's (or the reference's: timm's Lamb
    # has max_grad_norm always, None included, and so does our Lamb).
    reference = torch_class(name)(ps, lr=0.01)
    torch_keys = set(reference.state_dict()["param_groups"][0])
    torch_keys |= SAVED_GROUP_EXTRAS.get(name, set())
    if "max_grad_norm" in torch_keys:  # (timm's default)
        assert groups[0]["max_grad_norm"] == reference.defaults["max_grad_norm"]
    else:
        assert "max_grad_norm" not in groups[0] and "max_grad_norm" not in opt.param_groups[0]
    assert groups[1]["max_grad_norm"] == 1.5
    assert groups[2]["max_grad_norm"] == math.inf
    assert groups[3]["max_grad_norm"] is None  # (set in the group: kept, as torch keeps any key)
    assert set(groups[0]) == torch_keys
    assert set(groups[1]) == set(groups[3]) == torch_keys | {"max_grad_norm"}
    for saved, live in zip(groups, opt.param_groups):
        assert set(saved) == set(live) | SAVED_GROUP_EXTRAS.get(name, set())


@ONE_EACH
def test_state_dict_round_trips_max_grad_norm(cfg):
    ps, qs = _params(), _params()
    a = cfg.ours_cls([{"params": ps[:2]}, {"params": ps[2:], "max_grad_norm": 20.0}],
                     **{**_kwargs(cfg), "max_grad_norm": 3.0})
    for s in range(3):
        _set_grads(ps, s)
        a.step()
    b = cfg.ours_cls([{"params": qs[:2]}, {"params": qs[2:]}], **_kwargs(cfg))  # unclipped
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert [g["max_grad_norm"] for g in b.param_groups] == [3.0, 20.0]
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    for s in range(3, 6):
        _set_grads(ps, s)
        _set_grads(qs, s)
        a.step()
        b.step()
        assert torch.equal(a.grad_norm, b.grad_norm)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
    # copy.deepcopy / pickling keep it too
    assert [g["max_grad_norm"] for g in copy.deepcopy(a).param_groups] == [3.0, 20.0]


@ONE_EACH
def test_load_torch_checkpoint_keeps_our_max_grad_norm(cfg):
    ps, qs = _params(), _params()
    ref = cfg.torch_cls(ps, **_kwargs(cfg), foreach=False)
    for s in range(2):
        _set_grads(ps, s)
        ref.step()
    sd = ref.state_dict()
    ours = cfg.ours_cls(qs, **{**_kwargs(cfg), "max_grad_norm": 2.0})
    if "max_grad_norm" in inspect.signature(cfg.torch_cls).parameters:
        # A reference whose checkpoints carry max_grad_norm (timm's Lamb):
        # it is a hyperparameter there, loaded as any other.
        assert sd["param_groups"][0]["max_grad_norm"] is None
        ours.load_state_dict(copy.deepcopy(sd))
        assert ours.param_groups[0]["max_grad_norm"] is None
        return
    assert "max_grad_norm" not in sd["param_groups"][0]
    ours.load_state_dict(copy.deepcopy(sd))
    assert ours.param_groups[0]["max_grad_norm"] == 2.0
    # ... and clips with it from there: same as torch's clip + step.
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    for s in range(2, 5):
        _set_grads(ps, s)
        _set_grads(qs, s)
        norm = torch.nn.utils.clip_grad_norm_(ps, 2.0, foreach=False)
        assert norm > 2.0
        ref.step()
        ours.step()
        assert_close(ours.grad_norm, norm, **NORM_TOL[torch.float32])
        for p, q in zip(ps, qs):
            assert_close(q, p, **TOL[torch.float32])
    # A checkpoint of ours without the key (unclipped) keeps it as well.
    plain = cfg.ours_cls(_params(), **_kwargs(cfg))
    ours.load_state_dict(copy.deepcopy(plain.state_dict()))
    assert ours.param_groups[0]["max_grad_norm"] == 2.0


@ONE_EACH
def test_torch_optim_loads_our_clipped_checkpoint(cfg):
    ps, qs = _params(), _params()
    ours = cfg.ours_cls(ps, **{**_kwargs(cfg), "max_grad_norm": 1.0})
    for s in range(2):
        _set_grads(ps, s)
        ours.step()
    ref = cfg.torch_cls(qs, **_kwargs(cfg), foreach=False)
    ref.load_state_dict(copy.deepcopy(ours.state_dict()))
    with torch.no_grad():
        for p, q in zip(ps, qs):
            q.copy_(p)
    for key in ours.state[ps[0]]:
        assert torch.equal(ref.state[qs[0]][key], ours.state[ps[0]][key]), key
    _set_grads(qs, 5)
    ref.step()  # torch's step runs on the loaded state (the key is inert there)
    assert not torch.equal(qs[0], ps[0])


# ---------------------------------------------------------------------------
# 9. Errors
# ---------------------------------------------------------------------------

INVALID_MAX_GRAD_NORMS = {
    "zero": 0, "zero_float": 0.0, "negative": -1.0, "negative_int": -3, "neg_inf": -math.inf,
    "nan": math.nan, "string": "1.0", "true": True, "false": False, "list": [1.0],
    "tensor": torch.tensor(1.0), "complex": 1 + 0j,
}


@pytest.mark.parametrize("value", list(INVALID_MAX_GRAD_NORMS))
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_invalid_max_grad_norm_raises_before_anything_is_built(name, value):
    bad = INVALID_MAX_GRAD_NORMS[value]

    def params():  # a generator: consumed only by a constructor that got far
        yield from consumed

    consumed = [torch.randn(3, requires_grad=True)]
    gen = params()
    with pytest.raises(ValueError, match=r"^Invalid max_grad_norm value: "):
        getattr(fused_optim, name)(gen, max_grad_norm=bad)
    assert next(gen, None) is consumed[0], "the params were read before the check"


@pytest.mark.parametrize("value", [1, 0.5, 1e-30, math.inf, None])
def test_valid_max_grad_norm_values(value):
    opt = fused_optim.Adam([torch.randn(3, requires_grad=True)], max_grad_norm=value)
    # (unset, None, is not in the groups: Note [our options in param groups])
    assert ("max_grad_norm" in opt.param_groups[0]) == (value is not None)
    got = opt.param_groups[0].get("max_grad_norm")
    assert got == value and (value is None or type(got) is float)


@pytest.mark.parametrize("value", [-1.0, 0.0, math.nan], ids=str)
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_invalid_group_max_grad_norm_refused_at_step_changes_nothing(name, value):
    # A value written into a group (as torch.optim, groups are not
    # validated on assignment) is refused by the step, which changes
    # nothing: params, state, grads, and grad_norm (the last step's).
    params = _params()
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    opt = getattr(fused_optim, name)(
        [{"params": params[:2]}, {"params": params[2:], "max_grad_norm": 1.0}], **kwargs)
    _set_grads(params, 0)
    opt.step()
    norm = opt.grad_norm
    _set_grads(params, 1)
    snap = snapshot_optimizer(opt)  # (with the valid value: NaN != NaN)
    grads = [bits(p.grad) for p in params]
    opt.param_groups[1]["max_grad_norm"] = value
    with pytest.raises(RuntimeError, match="max_grad_norm must be positive"):
        opt.step()
    assert opt.param_groups[1]["max_grad_norm"] is value
    opt.param_groups[1]["max_grad_norm"] = 1.0
    assert_optimizer_unchanged(opt, snap, f"{name} refused step")
    for p, g in zip(params, grads):
        assert torch.equal(bits(p.grad), g)
    assert opt.grad_norm is norm, "a refused step changed grad_norm"


def _sparse_setup(name):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(20, 4, sparse=True)
    lin = torch.nn.Linear(4, 3)
    kwargs = dict(lr=0.1, momentum=0.9) if name == "SGD" else dict(lr=0.1)
    opt = getattr(fused_optim, name)(
        [{"params": list(lin.parameters()), "max_grad_norm": 1.0},
         {"params": list(emb.parameters())}], **kwargs)
    # A first step with a dense embedding gradient: state everywhere.
    for p in list(lin.parameters()) + list(emb.parameters()):
        p.grad = torch.randn_like(p)
    opt.step()

    def backward():
        opt.zero_grad()
        lin(emb(torch.tensor([1, 3, 3, 7]))).square().sum().backward()

    return emb, lin, opt, backward


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_sparse_gradient_with_max_grad_norm_raises_and_changes_nothing(name):
    # The sparse gradient is in the unclipped group: it still counts in the
    # norm, so the step refuses.
    emb, lin, opt, backward = _sparse_setup(name)
    backward()
    assert emb.weight.grad.is_sparse
    snap = snapshot_optimizer(opt)
    grads = [bits(p.grad) for p in list(lin.parameters()) + list(emb.parameters())]
    norm = opt.grad_norm.clone()
    with pytest.raises(RuntimeError, match=f"^fused_optim.{name}: max_grad_norm does not support "
                                           "sparse gradients$"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, f"{name} refused sparse step")
    for p, g in zip(list(lin.parameters()) + list(emb.parameters()), grads):
        assert torch.equal(bits(p.grad), g)
    assert torch.equal(opt.grad_norm, norm)
    # Without max_grad_norm the same step runs (the refusal is clipping's).
    opt.param_groups[0]["max_grad_norm"] = None
    opt.step()
    assert not torch.equal(bits(emb.weight), snap["params"][-1])


# ---------------------------------------------------------------------------
# 10. fused_optim.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_
# ---------------------------------------------------------------------------


def _twin_params(shapes=((7,), (33,), (4099,), (5, 3)), dtype=torch.float32, grads=True,
                 layouts=None):
    """Two lists of identical params with identical gradients."""
    out = []
    for _ in range(2):
        g = torch.Generator().manual_seed(3)
        ps = []
        for i, s in enumerate(shapes):
            p = torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            grad = (torch.randn(s, generator=g, dtype=torch.float64) * 2).to(dtype)
            layout = (layouts or {}).get(i)
            if layout == "transposed":
                grad = grad.t().contiguous().t()
            elif layout == "strided":
                buf = torch.zeros(s + (3,), dtype=dtype)
                buf[..., 1] = grad
                grad = buf[..., 1]
            if grads:
                p.grad = grad
            ps.append(p)
        out.append(ps)
    return out


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipped", "unclipped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64], ids=str)
def test_clip_grad_norm_matches_torch(dtype, max_norm):
    ours, ref = _twin_params(dtype=dtype)
    got = fused_optim.clip_grad_norm_(ours, max_norm)
    want = torch.nn.utils.clip_grad_norm_(ref, max_norm, foreach=False)
    real = torch.float64 if dtype == torch.float64 else torch.float32
    assert got.dtype == want.dtype == real and got.shape == ()
    assert_close(got, want, **NORM_TOL[real])
    for p, r in zip(ours, ref):
        if max_norm > 1e5:
            assert torch.equal(p.grad, r.grad)  # a factor of 1
        else:
            assert_close(p.grad, r.grad, **NORM_TOL[real])
    assert (want > max_norm) == (max_norm < 1e5)


def test_clip_grad_norm_single_tensor_generator_and_model():
    (p,), (r,) = _twin_params(shapes=((4099,),))
    got = fused_optim.clip_grad_norm_(p, 1.0)
    want = torch.nn.utils.clip_grad_norm_(r, 1.0)
    assert_close(got, want, **NORM_TOL[torch.float32])
    assert_close(p.grad, r.grad, **NORM_TOL[torch.float32])
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(),
                                          torch.nn.Linear(33, 5)))
        models[-1](torch.randn(4, 7)).square().sum().backward()
    got = fused_optim.clip_grad_norm_(models[0].parameters(), 0.1)  # a generator
    want = torch.nn.utils.clip_grad_norm_(models[1].parameters(), 0.1)
    assert want > 0.1
    assert_close(got, want, **NORM_TOL[torch.float32])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert_close(a.grad, b.grad, **NORM_TOL[torch.float32])


def test_clip_grad_norm_empty_and_gradless():
    for empty in ([], ()):
        got = fused_optim.clip_grad_norm_(empty, 1.0)
        want = torch.nn.utils.clip_grad_norm_(empty, 1.0)
        assert torch.equal(got, want) and got.dtype == want.dtype and got.shape == ()
    with pytest.warns(UserWarning, match="empty generator") as ours_warned:
        got = fused_optim.clip_grad_norm_((p for p in []), 1.0)
    with pytest.warns(UserWarning, match="empty generator") as torch_warned:
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    assert str(ours_warned[0].message) == str(torch_warned[0].message)
    assert torch.equal(got, torch.tensor(0.0))
    # No gradients at all; and some params without one.
    ours, ref = _twin_params(grads=False)
    assert torch.equal(fused_optim.clip_grad_norm_(ours, 1.0), torch.nn.utils.clip_grad_norm_(ref, 1.0))
    assert all(p.grad is None for p in ours)
    ours, ref = _twin_params()
    ours[1].grad = ref[1].grad = None
    got = fused_optim.clip_grad_norm_(ours, 1.0)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert_close(got, want, **NORM_TOL[torch.float32])
    assert ours[1].grad is None
    for p, r in zip(ours, ref):
        if r.grad is not None:
            assert_close(p.grad, r.grad, **NORM_TOL[torch.float32])


@pytest.mark.parametrize("norm_type", [math.inf, 1.0, 3.0, "inf"], ids=str)
def test_clip_grad_norm_other_norm_types_are_torchs(norm_type):
    ours, ref = _twin_params()
    got = fused_optim.clip_grad_norm_(ours, 0.5, norm_type=norm_type, foreach=False)
    want = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type=norm_type, foreach=False)
    assert want > 0.5
    assert torch.equal(got, want)
    for p, r in zip(ours, ref):
        assert torch.equal(p.grad, r.grad)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=str)
def test_clip_grad_norm_nonfinite(bad):
    ours, ref = _twin_params()
    ours[2].grad[5] = ref[2].grad[5] = bad
    before = [bits(p.grad) for p in ours]
    with pytest.raises(RuntimeError) as ours_error:
        fused_optim.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as torch_error:
        torch.nn.utils.clip_grad_norm_(ref, 1.0, error_if_nonfinite=True)
    assert str(ours_error.value) == str(torch_error.value)
    for p, g in zip(ours, before):  # nothing scaled
        assert torch.equal(bits(p.grad), g)
    # error_if_nonfinite=False: scaled by the non-finite norm, as torch does.
    got = fused_optim.clip_grad_norm_(ours, 1.0)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert torch.equal(got, want) or (got.isnan() and want.isnan())
    for p, r in zip(ours, ref):
        assert_close(p.grad, r.grad, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_clip_grad_norm_low_precision_norm_is_float32(dtype):
    ours, _ = _twin_params(dtype=dtype)
    grads = [p.grad.clone() for p in ours]
    want = norm64(grads)
    got = fused_optim.clip_grad_norm_(ours, 0.5)
    assert got.dtype == torch.float32 and got.shape == ()
    assert_close(got, want.float(), rtol=2e-6, atol=0)
    coef = torch.clamp(0.5 / (got + 1e-6), max=1.0)
    for p, g in zip(ours, grads):
        assert p.grad.dtype == dtype
        assert_close(p.grad, (g.float() * coef).to(dtype))
        assert_close(p.grad.double(), g.double() * 0.5 / want.item(), rtol=1e-2, atol=1e-5)


def test_clip_grad_norm_fp16_does_not_overflow_where_torchs_does():
    # Documented difference: torch's fp16 norm overflows past 65504.
    ours, ref = ([torch.full((4099,), 2000.0, dtype=torch.float16, requires_grad=True)]
                 for _ in range(2))
    for ps in (ours, ref):
        ps[0].grad = torch.full((4099,), 2000.0, dtype=torch.float16)
    got = fused_optim.clip_grad_norm_(ours, 1.0)
    want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert want.dtype == torch.float16 and not torch.isfinite(want)
    assert got.dtype == torch.float32
    assert_close(got, torch.tensor(2000.0 * math.sqrt(4099)), rtol=1e-6, atol=0)
    assert_close(ours[0].grad.float(), torch.full((4099,), 1 / math.sqrt(4099)), rtol=1e-3, atol=0)


def test_clip_grad_norm_complex_and_non_contiguous_grads():
    shapes = ((33, 65), (1001,), (7,))
    ours, ref = _twin_params(shapes=shapes, layouts={0: "transposed", 1: "strided"})
    assert not ours[0].grad.is_contiguous() and not ours[1].grad.is_contiguous()
    ptrs = [p.grad.data_ptr() for p in ours]
    got = fused_optim.clip_grad_norm_(ours, 0.5)
    want = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert_close(got, want, **NORM_TOL[torch.float32])
    assert [p.grad.data_ptr() for p in ours] == ptrs  # in place
    for p, r in zip(ours, ref):
        assert p.grad.stride() == r.grad.stride()
        assert_close(p.grad, r.grad, **NORM_TOL[torch.float32])
    ours, ref = _twin_params(shapes=shapes, dtype=torch.complex128)
    got = fused_optim.clip_grad_norm_(ours, 0.5)
    want = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert got.dtype == want.dtype == torch.float64
    assert_close(got, want, **NORM_TOL[torch.float64])
    for p, r in zip(ours, ref):
        assert_close(p.grad, r.grad, **NORM_TOL[torch.float64])


# torch.nn.utils.get_total_norm and clip_grads_with_norm_ (torch's two halves
# of clip_grad_norm_, for a norm reduced or logged in between): ours against
# torch's on the same tensors.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64], ids=str)
def test_get_total_norm_matches_torch(dtype):
    ours, ref = _twin_params(dtype=dtype)
    tensors = [p.grad for p in ours]
    before = [bits(t) for t in tensors]
    real = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.nn.utils.get_total_norm([p.grad for p in ref])
    for given in (tensors, tuple(tensors), iter(tensors), (t for t in tensors)):
        got = fused_optim.get_total_norm(given)
        assert got.dtype == want.dtype == real and got.shape == ()
        assert_close(got, want, **NORM_TOL[real])
    # params too (a norm of the weights, as people log it), which need a grad
    got = fused_optim.get_total_norm(ours)
    assert not got.requires_grad
    assert_close(got, torch.nn.utils.get_total_norm(ref), **NORM_TOL[real])
    assert_close(fused_optim.get_total_norm(tensors[2]), torch.nn.utils.get_total_norm(ref[2].grad),
                 **NORM_TOL[real])
    assert all(torch.equal(bits(t), b) for t, b in zip(tensors, before))  # reads only
    for empty in ([], ()):
        assert torch.equal(fused_optim.get_total_norm(empty), torch.nn.utils.get_total_norm(empty))


@pytest.mark.parametrize("norm_type", [math.inf, 1.0, 3.0, "inf"], ids=str)
def test_get_total_norm_other_norm_types_are_torchs(norm_type):
    ours, ref = _twin_params()
    got = fused_optim.get_total_norm([p.grad for p in ours], norm_type, foreach=False)
    want = torch.nn.utils.get_total_norm([p.grad for p in ref], norm_type, foreach=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=str)
def test_get_total_norm_nonfinite(bad):
    ours, ref = _twin_params()
    ours[1].grad[3] = ref[1].grad[3] = bad
    with pytest.raises(RuntimeError) as ours_error:
        fused_optim.get_total_norm([p.grad for p in ours], error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as torch_error:
        torch.nn.utils.get_total_norm([p.grad for p in ref], error_if_nonfinite=True)
    assert str(ours_error.value) == str(torch_error.value)
    got = fused_optim.get_total_norm([p.grad for p in ours])
    assert torch.equal(got, torch.nn.utils.get_total_norm([p.grad for p in ref])) or got.isnan()


@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clipped", "unclipped"])
def test_clip_grads_with_norm_scales_as_torchs(max_norm):
    # Given the same norm, the same factor and the same multiply: the same bits.
    ours, ref = _twin_params(layouts={0: "strided"})
    ours[1].grad = ref[1].grad = None  # a param without a gradient is left alone
    norm = torch.nn.utils.get_total_norm([p.grad for p in ref if p.grad is not None])
    assert (norm > max_norm) == (max_norm < 1e5)
    assert fused_optim.clip_grads_with_norm_(ours, max_norm, norm.clone()) is None
    torch.nn.utils.clip_grads_with_norm_(ref, max_norm, norm)
    for p, r in zip(ours, ref):
        assert (p.grad is None) == (r.grad is None)
        if r.grad is not None:
            assert p.grad.stride() == r.grad.stride()
            assert torch.equal(bits(p.grad), bits(r.grad))
    (p,), (r,) = _twin_params(shapes=((4099,),))  # one tensor, not a list
    fused_optim.clip_grads_with_norm_(p, 0.25, torch.tensor(3.0))
    torch.nn.utils.clip_grads_with_norm_(r, 0.25, torch.tensor(3.0))
    assert torch.equal(bits(p.grad), bits(r.grad))
    fused_optim.clip_grads_with_norm_([], 0.25, torch.tensor(3.0))  # nothing to scale


def test_clip_grad_norm_is_get_total_norm_then_clip_grads_with_norm():
    ours, halves = _twin_params()
    got = fused_optim.clip_grad_norm_(ours, 0.5)
    norm = fused_optim.get_total_norm([p.grad for p in halves])
    fused_optim.clip_grads_with_norm_(halves, 0.5, norm)
    assert torch.equal(got, norm) and got > 0.5
    for p, q in zip(ours, halves):
        assert torch.equal(bits(p.grad), bits(q.grad))


# ---------------------------------------------------------------------------
# 11. The sum_of_squares op
# ---------------------------------------------------------------------------

SOS = torch.ops.fused_optim.sum_of_squares
SOS_SIZES = [(1,), (7,), (33,), (4099,), (0,), (9, 17), (70_000,)]  # 70k: several blocks


def _tensors(dtype, sizes=SOS_SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * 3).to(dtype) for s in sizes]


def _sos_ref(tensors, inverse_scale=None):
    """Per-tensor float64 sums of squares, each element first multiplied by
    the float32 ``inverse_scale`` in its compute type (float32 for
    float32/16, bfloat16; float64 for float64)."""
    out = []
    for t in tensors:
        if t.is_complex():
            t = torch.view_as_real(t.resolve_conj())
        compute = torch.float64 if t.dtype == torch.float64 else torch.float32
        t = t.to(compute)
        if inverse_scale is not None:
            t = t * inverse_scale.to(compute)
        out.append(t.double().square().sum())
    return torch.stack(out)


def _out_dtype(tensors):
    double = any(t.dtype in (torch.float64, torch.complex128) for t in tensors)
    return torch.float64 if double else torch.float32


SOS_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
              torch.complex128]


@pytest.mark.parametrize("dtype", SOS_DTYPES, ids=str)
def test_sum_of_squares_values(dtype):
    tensors = _tensors(dtype)
    want = _sos_ref(tensors)
    out = _out_dtype(tensors)
    tol = dict(rtol=1e-13, atol=0) if out == torch.float64 else dict(rtol=2e-7, atol=0)
    for fn in (SOS, _C.sum_of_squares):
        per = fn(tensors, None, True)
        total = fn(tensors, None, False)
        assert per.dtype == total.dtype == out and per.shape == (len(tensors),) and total.shape == ()
        assert_close(per, want.to(out), **tol)
        assert_close(total, want.sum().to(out), **tol)
    assert torch.equal(SOS(tensors, None, True), _C.sum_of_squares(tensors, None, True))


def test_sum_of_squares_mixed_dtypes():
    tensors = [_tensors(torch.float32)[3], _tensors(torch.float64)[2], _tensors(torch.bfloat16)[1],
               _tensors(torch.complex64)[0], _tensors(torch.float16)[5]]
    per = SOS(tensors, None, True)
    assert per.dtype == torch.float64
    assert_close(per, _sos_ref(tensors), rtol=1e-13, atol=0)
    no_double = [t for t in tensors if t.dtype != torch.float64]
    assert SOS(no_double, None, False).dtype == torch.float32


@pytest.mark.parametrize("scale", [4096.0, 3.0, 0.125])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
def test_sum_of_squares_grad_scale(dtype, scale):
    tensors = _tensors(dtype, [(7,), (4099,), (33,)])
    for grad_scale in (torch.tensor(scale), torch.tensor([scale])):
        inverse = grad_scale.double().reciprocal().float()
        want = _sos_ref(tensors, inverse)
        out = _out_dtype(tensors)
        tol = dict(rtol=1e-13, atol=0) if out == torch.float64 else dict(rtol=2e-7, atol=0)
        assert_close(SOS(tensors, grad_scale, True), want.to(out), **tol)
        assert_close(SOS(tensors, grad_scale, False), want.sum().to(out), **tol)
        # (and it is not the unscaled sum)
        assert not torch.allclose(SOS(tensors, grad_scale, False), SOS(tensors, None, False))


def test_sum_of_squares_non_contiguous_inputs():
    base = _tensors(torch.float32, [(65, 33), (3003,), (40, 50)])
    tensors = [
        base[0].t(),  # transposed
        base[1][::3],  # strided slice
        base[1][1:4000],  # offset view
        base[2][:, 7:30],  # 2-D slice (rows not adjacent)
        base[2][3].expand(9, 50),  # stride 0 (each row counted)
        torch.view_as_complex(torch.randn(17, 2)).conj(),  # conjugate view
        torch.randn(6, 5).t()[::2],
    ]
    assert not any(tensors[i].is_contiguous() for i in (0, 1, 3, 4, 6))
    want = _sos_ref(tensors)
    assert_close(SOS(tensors, None, True), want.float(), rtol=2e-7, atol=0)
    assert_close(SOS(tensors, None, False), want.sum().float(), rtol=2e-7, atol=0)
    contiguous = [t.contiguous() if not t.is_complex() else t.resolve_conj() for t in tensors]
    assert torch.equal(SOS(tensors, None, True), SOS(contiguous, None, True))


def test_sum_of_squares_is_independent_of_the_thread_count():
    tensors = _tensors(torch.float32, [(300_001,), (5,), (70_000,)]) + _tensors(
        torch.float64, [(100_003,)], seed=1)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((SOS(tensors, None, True), SOS(tensors, torch.tensor(8.0), False)))
    finally:
        torch.set_num_threads(threads)
    for per, total in results[1:]:
        assert torch.equal(bits(per), bits(results[0][0]))
        assert torch.equal(bits(total), bits(results[0][1]))
    assert_close(results[0][0], _sos_ref(tensors), rtol=1e-13, atol=0)


def test_sum_of_squares_opcheck():
    samples = [
        (_tensors(torch.float32, [(3, 4), (7,), (1,)]), None, False),
        (_tensors(torch.float32, [(3, 4), (7,)]) + _tensors(torch.float64, [(5,)]),
         torch.tensor([4.0]), True),
        (_tensors(torch.bfloat16, [(9,)]) + _tensors(torch.float16, [(2, 3)]), torch.tensor(2.0),
         False),
        ([torch.randn(8, 6).t(), torch.randn(10)[::2]], None, True),
    ]
    for args in samples:
        result = torch.library.opcheck(SOS, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_sum_of_squares_on_meta_tensors():
    tensors = [torch.empty(5, device="meta"), torch.empty(3, 2, device="meta", dtype=torch.float64)]
    per = SOS(tensors, None, True)
    assert per.device.type == "meta" and per.shape == (2,) and per.dtype == torch.float64


SOS_ERRORS = {
    "sparse": (lambda: ([torch.randn(5).to_sparse()], None), r"[Ss]parse"),
    "sparse_second": (lambda: ([torch.randn(5), torch.randn(5).to_sparse()], None), r"[Ss]parse"),
    "int64": (lambda: ([torch.randn(3), torch.arange(3)], None),
              r"tensors\[1\] has dtype Long; expected float32, float64, float16 or bfloat16"),
    "int32": (lambda: ([torch.arange(3, dtype=torch.int32)], None), r"has dtype Int; expected"),
    "bool": (lambda: ([torch.ones(3, dtype=torch.bool)], None), r"has dtype Bool; expected"),
    "uint8": (lambda: ([torch.ones(3, dtype=torch.uint8)], None), r"has dtype Byte; expected"),
    # (meta is the one other device of a CPU-only machine: the CPU kernel
    # must not be bypassed into the fake one, which returns torch.empty)
    "mixed_devices_cpu_meta": (lambda: ([torch.randn(3), torch.randn(3, device="meta")], None),
                               r"tensors\[1\] is on meta but tensors\[0\] is on cpu"),
    "mixed_devices_meta_cpu": (lambda: ([torch.randn(3, device="meta"), torch.randn(3)], None),
                               r"tensors\[1\] is on cpu but tensors\[0\] is on meta"),
    "grad_scale_float64": (lambda: ([torch.randn(3)], torch.tensor([2.0], dtype=torch.float64)),
                           r"grad_scale must be float32, got Double"),
    "grad_scale_int": (lambda: ([torch.randn(3)], torch.tensor(2)), r"grad_scale must be float32"),
    "grad_scale_two_elements": (lambda: ([torch.randn(3)], torch.tensor([2.0, 4.0])),
                                r"grad_scale must be a one-element tensor"),
    "grad_scale_empty": (lambda: ([torch.randn(3)], torch.empty(0)),
                         r"grad_scale must be a one-element tensor"),
}
if torch.cuda.is_available() and fused_optim.cuda_built():
    SOS_ERRORS["mixed_devices_cpu_cuda"] = (
        lambda: ([torch.randn(3), torch.randn(3, device="cuda")], None), r"is on")


@pytest.mark.parametrize("case", list(SOS_ERRORS))
@pytest.mark.parametrize("per_tensor", [False, True])
def test_sum_of_squares_errors(case, per_tensor):
    make, match = SOS_ERRORS[case]
    for fn in (SOS, _C.sum_of_squares):
        tensors, grad_scale = make()
        with pytest.raises(RuntimeError, match=match):
            fn(tensors, grad_scale, per_tensor)
