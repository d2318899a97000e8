"""fused_optim.X against torch.optim.X(foreach=False), step by step, on the
params AND every state tensor (the numerics policy: tests/optim_configs.py)."""

from __future__ import annotations

import random

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR, StepLR

from harness import (
    P,
    Run,
    assert_runs_close,
    assert_same_state,
    bits,
    run_low_precision,
    run_parity,
    sometimes_none,
    unscaling_in_step,
)
from optim_configs import (
    GROUP_OVERRIDES,
    HAS_FUSED,
    MID_RUN_CHANGES,
    MODE_STATE_MADE_AS_ZEROS,
    MODES_TURNED_ON,
    LARGE_CONFIGS,
    LOW_PRECISION_DTYPES,
    ONE_PER_OPTIMIZER,
    OPTIM_CONFIGS,
    STATE_NAMES,
    STATE_OF_MODE,
)

ALL = pytest.mark.parametrize("cfg", OPTIM_CONFIGS, ids=str)
ONE_EACH = pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
LARGE = pytest.mark.parametrize("cfg", LARGE_CONFIGS, ids=str)
EXACT = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
LOW = pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=str)

STEPS = 10

# Sizes that hit the SIMD body and the tail, and 2-D/3-D.
SIZES = [(0,), (1,), (7,), (8,), (9,), (4099,), (7, 9), (3, 5, 7), (2, 0, 3)]
# Layouts: misaligned views, transposed param or grad, strided slices.
LAYOUTS = [
    P((4099,), layout="offset"),
    P((7,), layout="offset"),
    P((9, 17), layout="offset"),
    P((33, 65), layout="transposed"),  # transposed param, contiguous grad
    P((33, 65), grad_layout="transposed"),  # contiguous param, transposed grad
    P((33, 65), layout="transposed", grad_layout="transposed"),
    P((1001,), layout="strided"),  # every 3rd element of a buffer
    P((1001,), grad_layout="strided"),
    P((5, 7), layout="strided", grad_layout="strided"),
    P((4099,), layout="offset", grad_layout="strided"),
]


def one_group(specs):
    return [({}, specs)]


@ALL
@EXACT
def test_sizes_and_shapes(cfg, dtype, device):
    run_parity(cfg, one_group([P(s) for s in SIZES]), STEPS, dtype=dtype, device=device)


@LARGE
def test_large_tensor(cfg, device):
    # 1_000_003 elements: many SIMD blocks and work units plus a ragged tail;
    # few steps to keep CI fast.
    run_parity(cfg, one_group([P((1_000_003,)), P((9,))]), 3, device=device)


@ALL
def test_none_grads(cfg, device):
    # Param 1 gets its first grad at step 3 (lazy state then), param 2 skips
    # steps 4 and 7 (its step counter must not advance), param 3 never has one.
    specs = [P((9,)), P((3, 4)), P((8,)), P((5,)), P((4099,))]
    run_parity(cfg, one_group(specs), STEPS, device=device, has_grad=sometimes_none)


@ALL
def test_lr_changed_mid_run(cfg, device):
    def before_step(step, opt):
        if step == 5:
            for g in opt.param_groups:
                g["lr"] = g["lr"] * 0.3

    run_parity(cfg, one_group([P((7,)), P((4099,))]), STEPS, device=device,
               before_step=before_step)


@ALL
def test_hyperparameters_and_maximize_changed_mid_run(cfg, device):
    def before_step(step, opt):
        if step == 4:
            for g in opt.param_groups:
                g.update(MID_RUN_CHANGES[cfg.name])
                g["maximize"] = not g["maximize"]

    o1, _ = GROUP_OVERRIDES[cfg.name]
    run_parity(cfg, [({}, [P((7,)), P((4099,))]), (o1, [P((9,))])], STEPS, device=device,
               before_step=before_step)


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "torch_path"])
@pytest.mark.parametrize("cfg", [
    c for c in OPTIM_CONFIGS if c.name in MODES_TURNED_ON
    and not any(c.kwargs.get(k) for k in MODES_TURNED_ON[c.name])], ids=str)
def test_mode_turned_on_mid_run(cfg, fused, device):
    # Turned on at step 4, when param 2 has no gradient (sometimes_none):
    # its state for the mode is made at its next gradient (step 5), not
    # read as missing from the plan the toggle left. Param 1's first
    # gradient came at step 3. With fused=False (torch.optim's own code
    # steps the group in ours) the missing state is made the same way.
    if fused is False and cfg.name not in HAS_FUSED:
        pytest.skip(f"torch.optim.{cfg.name} takes no fused keyword")
    changes = MODES_TURNED_ON[cfg.name]
    zero_made = [STATE_OF_MODE[k] for k in changes if cfg.name in MODE_STATE_MADE_AS_ZEROS]

    def before_step(step, opt):
        if step == 4:
            for g in opt.param_groups:
                g.update(changes)
        if step >= 4 and not isinstance(opt, cfg.ours_cls):
            for p in opt.param_groups[0]["params"]:
                state = opt.state.get(p)
                if p.grad is not None and state:
                    for name in zero_made:
                        state.setdefault(name, torch.zeros_like(p))

    specs = [P((9,)), P((3, 4)), P((8,)), P((5,)), P((4099,))]
    kwargs = cfg.kwargs if fused is None else {**cfg.kwargs, "fused": False}
    ref, ours = run_parity(cfg, one_group(specs), STEPS, device=device, kwargs=kwargs,
                           has_grad=sometimes_none, before_step=before_step)
    for name in zero_made:
        assert name in ours.opt.state[ours.params[2]]  # (made at step 5)


SCHEDULERS = {
    "StepLR": lambda opt: StepLR(opt, step_size=3, gamma=0.5),
    "LambdaLR": lambda opt: LambdaLR(opt, lambda epoch: 1.0 / (1.0 + epoch)),
}


@ALL
@pytest.mark.parametrize("sched", list(SCHEDULERS))
def test_lr_scheduler(cfg, sched, device):
    run_parity(cfg, one_group([P((7,)), P((4099,))]), STEPS, device=device,
               scheduler=SCHEDULERS[sched])


@ALL
def test_tensor_lr_with_scheduler(cfg, device):
    # lr as a 1-element tensor; StepLR updates it in place (fill_), so the
    # value must be read at every step, not captured once.
    kwargs = {**cfg.kwargs, "lr": torch.tensor(cfg.lr)}
    run_parity(cfg, one_group([P((7,)), P((4099,))]), STEPS, device=device, kwargs=kwargs,
               scheduler=lambda opt: StepLR(opt, step_size=2, gamma=0.5))


@pytest.mark.parametrize("cfg", [c for c in OPTIM_CONFIGS if c.name in ("Adam", "AdamW")], ids=str)
def test_tensor_betas(cfg, device):
    # torch accepts betas as a pair of 1-element tensors (and converts them).
    b1, b2 = cfg.kwargs.get("betas", (0.9, 0.999))
    kwargs = {**cfg.kwargs, "betas": (torch.tensor(b1), torch.tensor(b2))}
    run_parity(cfg, one_group([P((7,)), P((4099,))]), STEPS, device=device, kwargs=kwargs)


@ALL
def test_param_groups_with_different_hyperparameters(cfg, device):
    o1, o2 = GROUP_OVERRIDES[cfg.name]
    groups = [
        ({}, [P((7,)), P((4099,))]),
        (o1, [P((9,)), P((3, 5))]),
        (o2, [P((8,)), P((1,)), P((1031,))]),
    ]
    run_parity(cfg, groups, STEPS, device=device)


@ALL
def test_param_groups_with_none_grads(cfg, device):
    o1, o2 = GROUP_OVERRIDES[cfg.name]
    groups = [({}, [P((7,))]), (o1, [P((9,)), P((3, 5))]), (o2, [P((8,)), P((100,))])]
    run_parity(cfg, groups, STEPS, device=device, has_grad=sometimes_none)


@ALL
def test_mixed_dtypes_in_one_group(cfg, device):
    # One group holding fp32 and fp64 tensors: the classes bucket by dtype.
    specs = [P((7,)), P((4099,), dtype=torch.float64), P((9,)), P((8,), dtype=torch.float64)]
    o1, _ = GROUP_OVERRIDES[cfg.name]
    run_parity(cfg, [({}, specs), (o1, [P((5,), dtype=torch.float64), P((6,))])], STEPS,
               device=device)


@ALL
@EXACT
def test_layouts(cfg, dtype, device):
    ptrs = []

    def record(step, opt):
        if step == 0:
            ptrs.append([p.data_ptr() for g in opt.param_groups for p in g["params"]])

    ref, ours = run_parity(cfg, one_group(LAYOUTS), STEPS, dtype=dtype, device=device,
                           before_step=record)
    # Updates are in place: every param still lives where it did (its view's
    # base buffer is compared with torch's by run_parity after every step).
    assert [p.data_ptr() for p in ours.params] == ptrs[1]


@ALL
@LOW
def test_low_precision(cfg, dtype, device):
    specs = [P((1,)), P((7,)), P((8,)), P((9,)), P((4099,)), P((33, 65))]
    run_low_precision(cfg, one_group(specs), STEPS, dtype, device=device)


@ALL
@LOW
def test_low_precision_layouts(cfg, dtype, device):
    run_low_precision(cfg, one_group(LAYOUTS), STEPS, dtype, device=device)


@LARGE
@LOW
def test_low_precision_large(cfg, dtype, device):
    # Large fp16/bf16 tensors with non-zero grads: torch once shipped a CPU
    # fused SGD that skipped whole SIMD blocks of fp16/bf16 (pytorch#191763).
    run_low_precision(cfg, one_group([P((1_000_003,)), P((9,))]), 3, dtype, device=device)


@ALL
def test_low_precision_param_groups(cfg, device):
    o1, o2 = GROUP_OVERRIDES[cfg.name]
    groups = [({}, [P((7,)), P((4099,))]), (o1, [P((9,))]), (o2, [P((1031,))])]
    run_low_precision(cfg, groups, STEPS, torch.bfloat16, device=device)


def _many_tensor_groups(name, n=500, seed=0):
    rng = random.Random(seed)
    o1, o2 = GROUP_OVERRIDES[name]
    overrides = [{}, o1, o2]
    specs = [[], [], []]
    for i in range(n):
        size = rng.choice([0, 1, 3, 8, 9, 64, 100, 257, 1000, 2049])
        shape = (size,) if i % 4 else (max(size // 8, 1), 8)
        specs[i % 3].append(P(shape))
    return list(zip(overrides, specs))


@ONE_EACH
def test_many_tensors(cfg, device):
    # ~500 tensors of mixed sizes in 3 groups with different hyperparameters
    # (one call per (device, dtype, mode flags) bucket, per-tensor hyperparameters).
    run_parity(cfg, _many_tensor_groups(cfg.name), 4, device=device)


# ---------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------

DET_SPECS = [P((1_000_003,)), P((4099,))] + [P((i % 37 + 1,)) for i in range(200)]


def _run_ours(cfg, device, threads, steps=3):
    torch.set_num_threads(threads)
    o1, o2 = GROUP_OVERRIDES[cfg.name]
    groups = [({}, DET_SPECS[:100]), (o1, DET_SPECS[100:]), (o2, [P((5000,))])]
    run = Run(cfg.ours_cls, groups, cfg.kwargs, device=device)
    for s in range(steps):
        run.set_grads(s)
        run.opt.step()
    return run


def _assert_bitwise_equal(a: Run, b: Run, where):
    for i, (pa, pb) in enumerate(zip(a.params, b.params)):
        assert torch.equal(bits(pa), bits(pb)), f"{where}: param {i} differs"
        sa, sb = a.state_of(i), b.state_of(i)
        assert set(sa) == set(sb)
        for k in sa:
            assert torch.equal(bits(sa[k]), bits(sb[k])), f"{where}: state {k} of param {i} differs"


@ONE_EACH
def test_deterministic_run_after_run(cfg, device):
    threads = max(torch.get_num_threads(), 2)
    a = _run_ours(cfg, device, threads)
    b = _run_ours(cfg, device, threads)
    _assert_bitwise_equal(a, b, "two identical runs")


@ONE_EACH
def test_independent_of_thread_count(cfg, device):
    a = _run_ours(cfg, device, 1)
    b = _run_ours(cfg, device, 2)
    _assert_bitwise_equal(a, b, "1 thread vs 2 threads")


# ---------------------------------------------------------------------------
# AMP GradScaler
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("in_step", [True, False], ids=["unscaled_in_step", "by_the_scaler"])
@ONE_EACH
def test_grad_scaler_with_inf_step(cfg, device, in_step):
    """GradScaler drives ours exactly as it drives torch.optim, whoever
    unscales (Note [who unscales under GradScaler]): same trajectory, and
    the step with an inf gradient is skipped entirely (params and state
    unchanged, step counters not advanced)."""
    groups = one_group([P((7,)), P((4099,)), P((3, 5))])
    ref = Run(cfg.torch_cls, groups, {**cfg.kwargs, "foreach": False}, device=device)
    cls, kwargs = unscaling_in_step(cfg.ours_cls, cfg.kwargs, in_step)
    ours = Run(cls, groups, kwargs, device=device)
    assert ours.opt._step_supports_amp_scaling == in_step
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=2)
               for _ in (ref, ours)]
    weights = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(device)
               for i, p in enumerate(ref.params)]
    for s in range(6):
        for run, scaler in zip((ref, ours), scalers):
            run.opt.zero_grad()
            loss = sum(((p * w) ** 2).sum() + (p * w).sum() for p, w in zip(run.params, weights))
            scaler.scale(loss).backward()
            if s == 2:
                with torch.no_grad():
                    run.params[1].grad.view(-1)[5] = float("inf")
            scaler.step(run.opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_runs_close(ours, ref, f"{cfg} GradScaler step {s}")
        if "step" in STATE_NAMES[cfg.name]:  # (SGD and Lion keep none)
            steps_done = ours.state_of(0)["step"].item()
            assert steps_done == (s if s >= 2 else s + 1), "the inf step must not count"


# ---------------------------------------------------------------------------
# Params and grads that are views into one flat buffer
# ---------------------------------------------------------------------------


@ALL
def test_params_and_grads_views_of_flat_buffers(cfg, device):
    """Adjacent, non-overlapping views of one flat param buffer, with grads
    that are views of one flat grad buffer (DDP's gradient_as_bucket_view,
    flat-parameter wrappers): sizes chosen so that views start misaligned."""
    shapes = [(7,), (33, 5), (9,), (4099,), (1,), (8, 3)]
    numels = [torch.Size(s).numel() for s in shapes]
    total = sum(numels)
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(total, generator=gen, dtype=torch.float64).to(torch.float32).to(device)

    def build(cls, kw):
        flat = init.clone()
        flat_grad = torch.zeros_like(flat)
        params, grads, off = [], [], 0
        for shape, n in zip(shapes, numels):
            p = flat[off:off + n].view(shape).requires_grad_()
            params.append(p)
            grads.append(flat_grad[off:off + n].view(shape))
            off += n
        o1, _ = GROUP_OVERRIDES[cfg.name]
        opt = cls([{"params": params[:3]}, {"params": params[3:], **o1}], **kw)
        return flat, flat_grad, params, grads, opt

    runs = [build(cfg.torch_cls, {**cfg.kwargs, "foreach": False}), build(cfg.ours_cls, cfg.kwargs)]
    for s in range(STEPS):
        g = torch.randn(total, generator=torch.Generator().manual_seed(100 + s),
                        dtype=torch.float64).to(torch.float32).to(device)
        for flat, flat_grad, params, grads, opt in runs:
            flat_grad.copy_(g)
            for p, gv in zip(params, grads):
                p.grad = gv
            opt.step()
        (ft, _, pt, _, ot), (fo, _, po, _, oo) = runs
        torch.testing.assert_close(fo, ft, msg=lambda m: f"{cfg} step {s} flat buffer: {m}")
        for i, (a, b) in enumerate(zip(po, pt)):
            assert_same_state(oo.state.get(a, {}), ot.state.get(b, {}), f"{cfg} step {s} param {i}")
    assert not torch.equal(runs[1][0], init)
