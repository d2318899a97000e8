"""fused_optim's CUDA kernels (csrc/cuda) on a GPU, on the shared harness
(tests/harness.py) and configuration tables (tests/optim_configs.py).

1. CUDA against the CPU kernels, bit for bit: both run the same update
   rules (update_rules.h) on the same inputs (harness runs built from the
   same specs and seed on each device).
2. Parity, as tests/test_parity.py checks it on the CPU: every configuration
   of OPTIM_CONFIGS against torch.optim (foreach=False) on CUDA, params and
   every state tensor after every step; fp32/fp64 within assert_close,
   bf16/fp16 by the 2x-of-torch error rule (run_low_precision); with sizes
   and layouts chosen for the CUDA kernels: 16K-element chunks, 16-byte
   vectors of 2 (fp64), 4 (fp32, mixed pairs) or 8 (fp16/bf16) elements and
   their tails, misaligned operands (the scalar path), staged layouts.
3. What only the launch planner can get wrong: many launches (the tensor
   list of one launch holds 42-61 tensors), more param groups than one
   launch's slot table holds (10-11), tensors of hundreds of chunks, 64-bit
   offsets past element 2^31.
4. What only the CUDA path does: the current stream, AMP's GradScaler with
   skipped steps (step counters and found_inf on the device), master
   weights, mixed state dtypes, stochastic rounding, CUDA graph capture of a
   whole training step.

The device-parametrized tests of the other modules also run on CUDA
(conftest.py's DEVICES). This module runs where DEVICES has "cuda" (a GPU,
and fused_optim built with CUDA) and is skipped elsewhere, e.g. in CI. On a
GPU machine: `bash scripts/gpu_check.sh` (builds in place, then runs this
module first; csrc/cuda/README.md).
"""

from __future__ import annotations

import inspect
import random

import pytest
import torch
from torch.testing import assert_close

import fused_optim
import test_ops as op_samples
from conftest import DEVICES
from fused_optim import _ops
from harness import (
    SCALAR_STATE_KEYS,
    P,
    Run,
    assert_runs_close,
    assert_same_state,
    bits,
    check_scalar_state,
    run_low_precision,
    run_parity,
    sometimes_none,
    step_device_of,
    unscaling_in_step,
)
from optim_configs import (
    EXACT_DTYPES,
    GROUP_OVERRIDES,
    HAS_CAPTURABLE,
    LOW_PRECISION_DTYPES,
    ONE_PER_OPTIMIZER,
    OPTIM_CONFIGS,
)

DEVICE = "cuda"

pytestmark = pytest.mark.skipif(
    DEVICE not in DEVICES,
    reason="needs a GPU and a CUDA build of fused_optim (DEVICES in tests/conftest.py)",
)

ALL = pytest.mark.parametrize("cfg", OPTIM_CONFIGS, ids=str)
ONE_EACH = pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
EXACT = pytest.mark.parametrize("dtype", EXACT_DTYPES, ids=str)
LOW = pytest.mark.parametrize("dtype", LOW_PRECISION_DTYPES, ids=str)

STEPS = 10

# Elements per chunk of the CUDA kernels (kChunkSize, csrc/cuda/multi_tensor_plan.h).
CHUNK = 16 * 1024

# Sizes around the vector widths (2, 4 or 8 elements per 16-byte vector, so
# tails of 1-7 elements) and the chunk (a last chunk of 1 element, two full
# chunks plus a tail), 2-D and empty tensors.
CUDA_SIZES = [
    (0,), (1,), (3,), (4,), (5,), (8,), (9,), (15,), (17,), (4099,),
    (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CHUNK + 7,), (129, 257), (2, 0, 3),
]

# Layouts as the CUDA path sees them: a tensor takes the vector path only if
# every operand is 16-byte aligned (a view at offset 1 is not, param or
# grad); layouts that differ from the param's are staged (DenseOperands) and
# copied back.
CUDA_LAYOUTS = [
    P((CHUNK + 1,), layout="offset"),  # misaligned param: all on the scalar path
    P((CHUNK + 1,), grad_layout="offset"),  # only the grad misaligned: scalar path too
    P((7,), layout="offset"),
    P((33, 65), layout="transposed"),  # transposed param, contiguous grad (staged)
    P((33, 65), grad_layout="transposed"),  # contiguous param, transposed grad (staged)
    P((129, 257), layout="transposed", grad_layout="transposed"),  # alike: not staged
    P((1001,), layout="strided"),  # param staged and copied back
    P((CHUNK + 3,), grad_layout="strided"),
    P((4099,), layout="offset", grad_layout="strided"),
]

# fp16/bf16 runs: bodies, tails, a chunk boundary, misaligned operands.
LOW_PRECISION_SPECS = [
    P((1,)), P((7,)), P((8,)), P((9,)), P((4099,)), P((CHUNK + 1,)), P((2 * CHUNK + 7,)),
    P((33, 65)), P((CHUNK + 1,), layout="offset"), P((CHUNK + 1,), grad_layout="offset"),
]


def one_group(specs):
    return [({}, specs)]


def _on_cpu_and_cuda(cls, groups, kwargs, **run_kwargs) -> tuple[Run, Run]:
    """Two runs of `cls` from the same specs and seed: on the CPU and on CUDA."""
    return tuple(Run(cls, groups, kwargs, device=d, **run_kwargs) for d in ("cpu", DEVICE))


def _step_all(runs, step):
    for run in runs:
        run.set_grads(step)
        run.opt.step()


def _max_abs_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (x.detach().cpu().double() - y.detach().cpu().double()).abs().max().item()


def _within_ulps_of_scale(cpu_t, cuda_t, where, ulps):
    """|cuda - cpu| <= ulps * eps * (|cpu| + max|cpu|), element by element:
    within a few roundings of the tensor's own scale. What a last-bit
    difference in a scalar every element reads (a sum, a power) leaves: it
    shifts each element's update by a relative eps, and an update is as large
    as the tensor's scale even where the element itself is near zero."""
    ref = cpu_t.detach()
    eps = torch.finfo(ref.dtype).eps
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert_close(cuda_t.detach().cpu(), ref, rtol=ulps * eps, atol=ulps * eps * scale,
                 msg=lambda m: f"{where}: {m}")


def _assert_same_bits(cpu_t, cuda_t, where, fp64_rtol=None, reduction_ulps=None):
    assert cpu_t.dtype == cuda_t.dtype, f"{where}: dtype {cpu_t.dtype} on the CPU, {cuda_t.dtype} on CUDA"
    if reduction_ulps is not None and cpu_t.is_floating_point():
        _within_ulps_of_scale(cpu_t, cuda_t, where, reduction_ulps)
    elif fp64_rtol is not None and cpu_t.dtype == torch.float64:
        _within_ulps_of_scale(cpu_t, cuda_t, where, fp64_rtol / torch.finfo(torch.float64).eps)
    else:
        assert torch.equal(bits(cpu_t), bits(cuda_t)), (
            f"{where}: CUDA differs from the CPU (max abs diff {_max_abs_diff(cpu_t, cuda_t):.3e})"
        )


def _assert_cuda_equals_cpu(cpu: Run, cuda: Run, where, fp64_rtol=None, reduction_ulps=None):
    """Params (and the whole base buffer of views), and every state tensor,
    of the CUDA run equal the CPU run's bit for bit; fp64 within fp64_rtol
    of each tensor's scale when given; every dtype within reduction_ulps of
    it when given (see test_cuda_equals_cpu_bit_for_bit)."""
    tol = dict(fp64_rtol=fp64_rtol, reduction_ulps=reduction_ulps)
    for i, (a, b) in enumerate(zip(cpu.params, cuda.params)):
        w = f"{where} param {i} {cpu.specs[i]}"
        _assert_same_bits(a, b, w, **tol)
        if a._base is not None:
            _assert_same_bits(a._base, b._base, f"{w} (whole base buffer)", **tol)
        sa, sb = cpu.state_of(i), cuda.state_of(i)
        assert set(sa) == set(sb), f"{w}: state keys {sorted(sa)} on the CPU, {sorted(sb)} on CUDA"
        for k in sa:
            if k == "step" or k in SCALAR_STATE_KEYS:
                assert sb[k].device == step_device_of(b), f"{w}: {k} on {sb[k].device}"
            _assert_same_bits(sa[k], sb[k], f"{w} state[{k!r}]", **tol)


# ---------------------------------------------------------------------------
# 1. CUDA == CPU (gpu_check.sh's smoke stage selects "bit_for_bit and float32")
# ---------------------------------------------------------------------------


@ALL
@EXACT
def test_cuda_equals_cpu_bit_for_bit(cfg, dtype):
    # Both backends run the same update rules (update_rules.h) on scalars
    # derived by the same functions in double (the CPU on the host, CUDA on
    # the device from its device step counters), with IEEE division and sqrt
    # and no FMA contraction (-ffp-contract=off on the host, --fmad=false in
    # nvcc), so results must agree exactly. One caveat (csrc/cuda/README.md):
    # the device's double pow (beta ** step) is CUDA's, not glibc's; it may
    # differ in the last bit of a double, which narrowing to float hides but
    # fp64 params may show as a 1-ulp difference: hence fp64's tiny rtol.
    # The other: a step that reads sums over many elements (_reads_sums)
    # adds them in another order on each backend; the last bits of a sum
    # differ, so every element may move by a rounding or two per step. That
    # the rest of such a step is exact on both, given the same sums, is
    # test_norm_ops_given_the_same_sums_cuda_equals_cpu_bit_for_bit.
    specs = [P(s) for s in CUDA_SIZES] + [
        P((10_001,), layout="offset"),
        P((CHUNK + 1,), grad_layout="offset"),
    ]
    runs = _on_cpu_and_cuda(cfg.ours_cls, one_group(specs), cfg.kwargs, dtype=dtype)
    for step in range(STEPS):
        _step_all(runs, step)
        ulps = 4 * (step + 1) if _reads_sums(cfg) else None
        _assert_cuda_equals_cpu(*runs, f"{cfg} {dtype} step {step}", fp64_rtol=1e-14,
                                reduction_ulps=ulps)


# The op-level samples of test_ops.py: LARS and LAMB with per-group flags,
# modes, and each group's way of adapting (test_ops.lars_inputs, lamb_inputs).
NORM_CASES = [case for case in op_samples.CASES if case[0] in _ops.TENSOR_NORM_OPS]


@pytest.mark.parametrize("amp_and_clipping", [False, True], ids=["plain", "amp_and_clipping"])
@pytest.mark.parametrize("case", NORM_CASES, ids=op_samples._case_id)
@EXACT
def test_norm_ops_given_the_same_sums_cuda_equals_cpu_bit_for_bit(case, dtype, amp_and_clipping):
    # Each backend measures its sums (the `measure` overload), which agree
    # up to the order of the additions; handed the same sums (tensor_sums:
    # Note [norms across shards]), the rest of the step is the same function
    # on both, to the bit, for every written tensor.
    op, i = case
    calls = {}
    for device in ("cpu", DEVICE):
        named = op_samples._inputs(op, i, dtype, device)
        if amp_and_clipping:
            named = op_samples._with_amp_and_clipping(named, device)
        calls[device] = named
    sums = {}
    for device, named in calls.items():
        args, kwargs = op_samples._split(op, named)
        sums[device] = op_samples._measure_op(op)(*args, **kwargs)
    assert sums[DEVICE].device.type == torch.device(DEVICE).type
    assert_close(sums[DEVICE].cpu(), sums["cpu"], rtol=1e-12, atol=0)  # (the order of the sums)
    for device, named in calls.items():
        op_samples._call_public(op, {**named, "tensor_sums": sums["cpu"].to(device)})
    cuda_written = op_samples._written(op, calls[DEVICE])
    for name, cpu_list in op_samples._written(op, calls["cpu"]).items():
        assert len(cpu_list) == len(cuda_written[name])
        for t, (a, b) in enumerate(zip(cpu_list, cuda_written[name])):
            _assert_same_bits(a, b, f"{op} {dtype} {name}[{t}]")


def _reads_sums(cfg) -> bool:
    """Whether cfg's step reads sums over many elements: per-tensor norms
    (LARS, LAMB) or the global gradient norm it clips by (max_grad_norm)."""
    keyword = inspect.signature(cfg.ours_cls).parameters.get("max_grad_norm")
    clips = cfg.kwargs.get("max_grad_norm", keyword.default if keyword else None)
    return cfg.ours_cls._op_name in _ops.TENSOR_NORM_OPS or clips is not None


# ---------------------------------------------------------------------------
# 2. Parity with torch.optim on CUDA
# ---------------------------------------------------------------------------


@ALL
@EXACT
def test_parity_sizes(cfg, dtype):
    run_parity(cfg, one_group([P(s) for s in CUDA_SIZES]), STEPS, dtype=dtype, device=DEVICE)


@ALL
@EXACT
def test_parity_layouts(cfg, dtype):
    run_parity(cfg, one_group(CUDA_LAYOUTS), STEPS, dtype=dtype, device=DEVICE)


@ALL
@LOW
def test_low_precision(cfg, dtype):
    run_low_precision(cfg, one_group(LOW_PRECISION_SPECS), STEPS, dtype, device=DEVICE)


@ALL
def test_param_groups_with_none_grads(cfg):
    # Groups whose mode flags differ (separate kernel calls) and None grads:
    # param 1 gets its first grad at step 3 (state made then), param 2 skips
    # steps 4 and 7 (its device step counter must not advance), param 3
    # never has one (harness.sometimes_none).
    o1, o2 = GROUP_OVERRIDES[cfg.name]
    groups = [
        ({}, [P((7,)), P((CHUNK + 1,))]),
        (o1, [P((9,)), P((3, 5))]),
        (o2, [P((8,)), P((4099,))]),
    ]
    run_parity(cfg, groups, STEPS, device=DEVICE, has_grad=sometimes_none)


# ---------------------------------------------------------------------------
# 3. The launch planner
# ---------------------------------------------------------------------------


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors]) if tensors else torch.empty(0)


def _assert_runs_close_pooled(ours: Run, ref: Run, where: str):
    """assert_runs_close for runs of thousands of tensors, in a few calls:
    all params (and each state name) concatenated, which assert_close
    checks element by element just the same. On a failure, assert_runs_close
    names the tensor."""
    n = len(ours.params)
    try:
        for i in range(n):
            assert set(ours.state_of(i)) == set(ref.state_of(i)), f"param {i}: state keys differ"
        assert_close(_flat(ours.params), _flat(ref.params))
        names = sorted(set().union(*(ref.state_of(i) for i in range(n))))
        for k in names:
            have = [i for i in range(n) if k in ref.state_of(i)]
            o = [ours.state_of(i)[k] for i in have]
            r = [ref.state_of(i)[k] for i in have]
            if k == "step":
                assert all(t.device == step_device_of(ours.params[i]) for t, i in zip(o, have))
                assert torch.equal(torch.stack(o).cpu(), torch.stack(r).cpu()), "steps differ"
            elif k in SCALAR_STATE_KEYS:  # (kept where the step is, as torch's dtype)
                for t, rt, i in zip(o, r, have):
                    check_scalar_state(t, rt, f"{where} param {i} state[{k!r}]",
                                       step_device_of(ours.params[i]))
            else:
                assert all(a.dtype == b.dtype and a.device == b.device for a, b in zip(o, r))
                assert_close(_flat(o), _flat(r))
    except AssertionError:
        assert_runs_close(ours, ref, where)  # the first tensor that differs
        raise


@ONE_EACH
def test_thousands_of_tensors_over_several_launches(cfg):
    # 1500 tensors do not fit one launch's metadata (42-61 tensors each, by
    # operand count): the planner must split them and cover every element
    # once. Three groups (per-group hyperparameters and weight-decay modes
    # in one call, across launch boundaries); sizes from empty to 2 chunks.
    rng = random.Random(0)
    sizes = [rng.choice([0, 1, 7, 8, 9, 100, 1031, 4099, CHUNK, CHUNK + 1]) for _ in range(1500)]
    decay = {"weight_decay": 0.0 if cfg.kwargs.get("weight_decay") else 0.01}
    groups = [
        ({}, [P((n,)) for n in sizes[0::3]]),
        ({"lr": cfg.lr * 0.3}, [P((n,)) for n in sizes[1::3]]),
        (decay, [P((n,)) for n in sizes[2::3]]),
    ]
    ref = Run(cfg.torch_cls, groups, {**cfg.kwargs, "foreach": False}, device=DEVICE)
    ours = Run(cfg.ours_cls, groups, cfg.kwargs, device=DEVICE)
    for step in range(3):
        _step_all((ref, ours), step)
        _assert_runs_close_pooled(ours, ref, f"{cfg} step {step}")


@ALL
def test_more_param_groups_than_one_launch_holds(cfg):
    # 24 groups that differ in numeric hyperparameters only (lr, and the
    # weight-decay mode in every third), so one kernel call: 24 hyperparameter
    # sets overflow one launch's slot table (10-11 slots), and 72 tensors its
    # tensor list.
    decay = 0.0 if cfg.kwargs.get("weight_decay") else 0.01
    groups = []
    for k in range(24):
        overrides = {"lr": cfg.lr * (0.5 + 0.05 * k)}
        if k % 3 == 0:
            overrides["weight_decay"] = decay
        groups.append((overrides, [P((1 + k,)), P((9,)), P((CHUNK + 1 + k,))]))
    run_parity(cfg, groups, 4, device=DEVICE)


@ONE_EACH
def test_tensor_of_many_chunks_beside_small_ones(cfg):
    # A tensor of 257 chunks (the last of 15 elements) between tiny tensors:
    # chunk-to-element mapping and the tail path.
    specs = [P((3,)), P((256 * CHUNK + 15,)), P((1,)), P((8,)), P((4099,))]
    run_parity(cfg, one_group(specs), 3, device=DEVICE)


def test_tensor_over_2_31_elements_is_updated_to_its_end():
    # apex, DeepSpeed and TransformerEngine shipped silent non-updates past
    # element 2^31 (32-bit offsets). bf16 param + grad: about 8.6 GB; 131K
    # chunks, more than one grid of 64K blocks (the grid-stride loop).
    n = 2**31 + 1025
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2:
        pytest.skip(f"needs {3 * n * 2 / 2**30:.1f} GiB of free GPU memory")
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16, device=DEVICE))
    p.grad = torch.ones_like(p)
    fused_optim.SGD([p], lr=1.0).step()
    # every element moved by -lr * grad = -1, the last ones included
    minus_one = torch.full((1024,), -1.0, dtype=torch.bfloat16, device=DEVICE)
    for where in (slice(0, 1024), slice(2**31 - 512, 2**31 + 512), slice(n - 1024, n)):
        assert torch.equal(p.detach()[where], minus_one)
    assert int((p.detach() != -1).sum()) == 0


# ---------------------------------------------------------------------------
# 4. What only the CUDA path does
# ---------------------------------------------------------------------------


def test_step_runs_on_the_current_stream():
    # The kernels launch on torch's current stream: work queued on a side
    # stream before the step is ordered before it, with no extra
    # synchronisation. The grad is written on the side stream after a long
    # GPU sleep, so a step launched on any other stream would read it
    # before it is written.
    p = torch.nn.Parameter(torch.zeros(1 << 20, device=DEVICE))  # on the default stream
    opt = fused_optim.SGD([p], lr=1.0)
    main = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    # The side stream must not use p before the default stream has made it.
    side.wait_stream(main)
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time before what follows
        p.grad = torch.ones_like(p)  # allocated and written on the side stream
        opt.step()
    # p (the default stream's) was used on the side stream: its memory must
    # not be reused before the side stream's work is done.
    p.record_stream(side)
    # The default stream reads the results only after the side stream's work.
    main.wait_stream(side)
    # The grad (the side stream's) is now used on the default stream.
    p.grad.record_stream(main)
    assert torch.equal(p.detach(), torch.full_like(p, -1.0))
    assert torch.equal(p.grad, torch.ones_like(p))


def _loss(run: Run, step: int, inject_inf: bool):
    """A loss whose gradients are p's own values plus a fixed random term
    (the same for both runs), times inf on chosen steps."""
    loss = 0
    for i, p in enumerate(run.params):
        gen = torch.Generator().manual_seed(1000 * step + i)
        x = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
        loss = loss + (p * x).sum() + 0.5 * (p * p).sum()
    if inject_inf:
        loss = loss * float("inf")
    return loss


@pytest.mark.parametrize("in_step", [True, False], ids=["unscaled_in_step", "by_the_scaler"])
@ALL
def test_grad_scaler_matches_torch_with_skipped_steps(cfg, in_step):
    # in_step: ours takes grad_scale/found_inf from the GradScaler
    # (_step_supports_amp_scaling, fused=True): unscales in the kernel,
    # writes the unscaled grads back, and skips the step on the device when
    # found_inf; else the scaler unscales (the default, as torch's).
    # torch.optim (foreach=False) is driven by its own scaler, which unscales
    # with its own kernel and skips in Python. Params, state, step counts and
    # the scaler's scale must match; steps 2 and 5 carry an inf.
    groups = one_group([P((1,)), P((7,)), P((4099,)), P((CHUNK + 1,))])
    ref = Run(cfg.torch_cls, groups, {**cfg.kwargs, "foreach": False}, device=DEVICE)
    cls, kwargs = unscaling_in_step(cfg.ours_cls, cfg.kwargs, in_step)
    ours = Run(cls, groups, kwargs, device=DEVICE)
    assert ours.opt._step_supports_amp_scaling == in_step
    scalers = [torch.amp.GradScaler(DEVICE, init_scale=2.0**12, growth_interval=3) for _ in range(2)]
    for step in range(8):
        inject = step in (2, 5)
        for run, scaler in zip((ref, ours), scalers):
            run.opt.zero_grad(set_to_none=True)
            scaler.scale(_loss(run, step, inject)).backward()
            scaler.step(run.opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        assert_runs_close(ours, ref, f"{cfg} GradScaler step {step}")
        if not inject:
            # the unscaled grads were written back
            for i, (p, q) in enumerate(zip(ours.params, ref.params)):
                assert_close(p.grad, q.grad, msg=lambda m: f"{cfg} step {step} grad {i}: {m}")
    # 8 steps, 2 skipped: the counters did not advance on the device
    for p in ours.params:
        state = ours.opt.state[p]
        if "step" in state:
            assert state["step"].device == p.device
            assert state["step"].item() == 6


@ALL
def test_bf16_params_with_master_weights_follow_fp32_torch(cfg):
    # bf16 params with fp32 master weights: the update runs on the master
    # copy in fp32 (state fp32 by default), and the bf16 param is the master
    # rounded to nearest. torch.optim in fp32 from the same (bf16) starting
    # values, fed the same (bf16) gradients (quantize=bf16), must track the
    # master.
    specs = [P((1,)), P((7,)), P((8,)), P((9,)), P((4099,)), P((CHUNK + 1,)),
             P((CHUNK + 1,), layout="offset")]
    bf16 = torch.bfloat16
    ours = Run(cfg.ours_cls, one_group(specs), {**cfg.kwargs, "master_weights": True},
               dtype=bf16, device=DEVICE)
    ref = Run(cfg.torch_cls, one_group(specs), {**cfg.kwargs, "foreach": False},
              dtype=torch.float32, device=DEVICE, quantize=bf16)
    for step in range(STEPS):
        _step_all((ref, ours), step)
        for i, (p, q) in enumerate(zip(ours.params, ref.params)):
            w = f"{cfg} step {step} param {i} {ours.specs[i]}"
            if step == 0:  # the premise: same gradients
                assert torch.equal(p.grad.float(), q.grad), w
            state = dict(ours.state_of(i))
            master = state.pop("master_param")
            assert master.dtype == torch.float32 and master.shape == p.shape, w
            assert master.device == p.device, w
            assert_close(master, q.detach(), msg=lambda m: f"{w} master: {m}")
            assert torch.equal(bits(p), bits(master.to(bf16))), f"{w}: param != RNE(master)"
            # the other state: torch's names, dtypes (fp32) and values
            assert_same_state(state, ref.state_of(i), w, step_device=step_device_of(p))


@ONE_EACH
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_mixed_state_dtype_cuda_equals_cpu(cfg, param_dtype, state_dtype):
    # Mixed element sizes through the vector path (e.g. bf16 params with
    # fp32 state: 8-byte param loads beside 16-byte state loads), tails and
    # misaligned views; CUDA and CPU run the same rules on the same inputs.
    specs = [P(s) for s in CUDA_SIZES] + [P((10_001,), layout="offset")]
    kwargs = {**cfg.kwargs, "state_dtype": state_dtype}
    runs = _on_cpu_and_cuda(cfg.ours_cls, one_group(specs), kwargs, dtype=param_dtype)
    for step in range(5):
        _step_all(runs, step)
    _assert_cuda_equals_cpu(*runs, f"{cfg} {param_dtype} state {state_dtype}")
    cuda = runs[1]
    for i in range(len(cuda.params)):
        for key, value in cuda.state_of(i).items():
            # (step counters and 0-d scalar state keep torch's float32,
            # whatever state_dtype: SCALAR_STATE_KEYS)
            if key != "step" and key not in SCALAR_STATE_KEYS:
                assert value.dtype == state_dtype, f"param {i} state[{key!r}]: {value.dtype}"


@ALL
def test_stochastic_rounding_cuda_equals_cpu(cfg):
    # The random bits are a pure function of (tensor position in the call
    # and group, step, element) (precision.h), so both backends round
    # identically; two groups (two calls when their mode flags differ).
    o1, _ = GROUP_OVERRIDES[cfg.name]
    groups = [
        ({}, [P((1,)), P((7,)), P((8,)), P((9,)), P((4099,)), P((CHUNK + 1,))]),
        (o1, [P((9,)), P((2 * CHUNK + 7,)), P((4099,), layout="offset")]),
    ]
    kwargs = {**cfg.kwargs, "stochastic_rounding": True}
    runs = _on_cpu_and_cuda(cfg.ours_cls, groups, kwargs, dtype=torch.bfloat16)
    for step in range(5):
        _step_all(runs, step)
        _assert_cuda_equals_cpu(*runs, f"{cfg} step {step}")


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)
    ).to(DEVICE)


@ALL
def test_captured_training_step_replays_like_eager_steps(cfg):
    # A whole training step (forward, backward, optimizer.step()) captured
    # in a CUDA graph and replayed must equal the same steps run eagerly:
    # the step counters advance on the device, the scalars are derived on the
    # device, and the lr is read from its tensor, so a scheduler-style
    # `lr.fill_()` between replays takes effect. (`capturable` only where
    # torch has the keyword: ours never syncs on CUDA either way.)
    def build():
        model = _mlp(0)
        lr = torch.tensor(cfg.lr, device=DEVICE)
        kwargs = {**cfg.kwargs, "lr": lr}
        if cfg.name in HAS_CAPTURABLE:
            kwargs["capturable"] = True
        return model, lr, cfg.ours_cls(model.parameters(), **kwargs)

    graphed, lr_graphed, opt = build()
    eager, lr_eager, ref = build()
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(32, 64, generator=generator).to(DEVICE),
         torch.randn(32, 10, generator=generator).to(DEVICE))
        for _ in range(12)
    ]
    static_x = torch.zeros(32, 64, device=DEVICE)
    static_y = torch.zeros(32, 10, device=DEVICE)

    def train_step(model, optimizer, x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()

    # warm up on a side stream (state and workspaces exist before capture)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            opt.zero_grad(set_to_none=True)
            train_step(graphed, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:3]:
        ref.zero_grad(set_to_none=True)
        train_step(eager, ref, x, y)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        train_step(graphed, opt, static_x, static_y)

    for i, (x, y) in enumerate(batches[3:]):
        if i == 5:  # as a scheduler does with a tensor lr
            lr_graphed.fill_(cfg.lr * 0.3)
            lr_eager.fill_(cfg.lr * 0.3)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        ref.zero_grad(set_to_none=True)
        train_step(eager, ref, x, y)
        for k, (p, q) in enumerate(zip(graphed.parameters(), eager.parameters())):
            w = f"{cfg} replay {i} param {k}"
            assert_close(p, q, msg=lambda m: f"{w}: {m}")
            assert_same_state(opt.state[p], ref.state[q], w)
    for p in graphed.parameters():
        if "step" in opt.state[p]:
            assert opt.state[p]["step"].device == p.device
            assert opt.state[p]["step"].item() == 12
