"""Mixed precision: master weights, low-precision state, stochastic rounding.

References. torch.optim has none of these options, so the reference is
torch.optim's float32 single-tensor step on float32 copies, with the rounding
each option implies applied after every step:
- ``master_weights``: the float32 run IS the master copy; the bf16/fp16
  param must be the master rounded to nearest;
- ``state_dtype=torch.bfloat16``: the state is rounded to bf16 after each
  step (the kernel computes in fp32 and rounds on the store, the same thing);
- bf16 params without master weights: the param is rounded to bf16 after
  each step.
Stochastic rounding has no torch counterpart: its bits are checked against
a NumPy re-implementation of csrc/include/fused_optim/precision.h, and its
statistics against what it promises (unbiased rounding).
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import fused_optim
from fused_optim import _ops
from harness import SCALAR_STATE_KEYS, assert_optimizer_unchanged, bits, snapshot_optimizer
from optim_configs import NOT_IN_TORCH, ONE_PER_OPTIMIZER, OPTIMIZER_NAMES

# Sizes that hit the vector bodies and the tails of every SIMD width.
SHAPES = [(1,), (7,), (8,), (9,), (4099,), (33, 65)]
STEPS = 8


def _grad(shape, step, index):
    """A fixed direction plus noise, |g| >= 0.25 (as harness.make_grad: no
    element near 0, where Adam's m / (sqrt(v) + eps) turns rounding
    differences of either side into large ones)."""
    d = torch.randn(shape, generator=torch.Generator().manual_seed(77 + index))
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(1000 * step + index))
    return d.sign() * (0.5 + 0.5 * d.abs()) + 0.25 * (2 * noise - 1)


def _params(dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in SHAPES]


class Emulated:
    """torch.optim in float32, rounded as an option implies after each step."""

    def __init__(self, cfg, params, round_params_to=None, round_state_to=None):
        self.params = [p.detach().float().clone().requires_grad_() for p in params]
        self.opt = cfg.torch_cls(self.params, **{**cfg.kwargs, "foreach": False})
        self.round_params_to = round_params_to
        self.round_state_to = round_state_to

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g.float().clone()
        self.opt.step()
        with torch.no_grad():
            for p in self.params:
                if self.round_params_to is not None:
                    p.copy_(p.to(self.round_params_to))
                if self.round_state_to is not None:
                    for key, value in self.opt.state[p].items():
                        # (0-d per-param scalars stay float32: not state
                        # of the state dtype, Note [per-tensor scalar state])
                        if key != "step" and key not in SCALAR_STATE_KEYS:
                            value.copy_(value.to(self.round_state_to))


def _run_pair(cfg, dtype, options, **emulation):
    ours_params = _params(dtype)
    ours = cfg.ours_cls(ours_params, **cfg.kwargs, **options)
    ref = Emulated(cfg, ours_params, **emulation)
    for step in range(STEPS):
        grads = [_grad(p.shape, step, i).to(dtype) for i, p in enumerate(ours_params)]
        for p, g in zip(ours_params, grads):
            p.grad = g
        ours.step()
        ref.step(grads)
        yield step, ours, ours_params, ref


def _param_tol(cfg, state_dtype, step):
    """fp32 state: torch's fp32 tolerances (assert_close defaults). bf16
    state: ours and the emulation round fp32 values that may differ in the
    last fp32 bit, so a state element can land one bf16 ulp apart (2^-8
    relative), which changes that element's update by at most about that
    much, every step after: |dp| <= (steps so far) * lr * 2^-8."""
    if state_dtype == torch.float32:
        return {}
    return dict(rtol=1.3e-6, atol=(step + 1) * cfg.lr * 2.0**-8)


STATE_TOL = {torch.float32: {}, torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}


def _assert_state_close(ours_state, ref_state, state_dtype, where):
    for key, value in ref_state.items():
        if key == "step" or key in SCALAR_STATE_KEYS:
            # (0-d per-param scalars keep torch's dtype whatever the state
            # dtype: float32)
            assert float(ours_state[key]) == float(value), f"{where} {key}"
            assert ours_state[key].dtype == value.dtype, f"{where} {key}"
            continue
        got = ours_state[key]
        assert got.dtype == state_dtype, f"{where} {key} has dtype {got.dtype}"
        assert_close(got.float(), value, **STATE_TOL[state_dtype],
                     msg=lambda m: f"{where} {key}: {m}")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_master_weights(cfg, dtype, state_dtype):
    options = dict(master_weights=True, state_dtype=state_dtype)
    rounding = None if state_dtype == torch.float32 else state_dtype
    for step, ours, params, ref in _run_pair(cfg, dtype, options, round_state_to=rounding):
        for i, (p, r) in enumerate(zip(params, ref.params)):
            where = f"{cfg} {dtype} step {step} param {i}"
            state = ours.state[p]
            master = state["master_param"]
            assert master.dtype == torch.float32
            assert_close(master, r.detach(), **_param_tol(cfg, state_dtype, step),
                         msg=lambda m: f"{where} master: {m}")
            # the param is the master rounded to nearest, bit for bit
            assert torch.equal(bits(p.detach()), bits(master.to(dtype))), where
            _assert_state_close({k: v for k, v in state.items() if k != "master_param"},
                                ref.opt.state[r], state_dtype, where)


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_bf16_state_for_fp32_params(cfg):
    for step, ours, params, ref in _run_pair(cfg, torch.float32, dict(state_dtype=torch.bfloat16),
                                             round_state_to=torch.bfloat16):
        for i, (p, r) in enumerate(zip(params, ref.params)):
            where = f"{cfg} step {step} param {i}"
            assert_close(p, r, **_param_tol(cfg, torch.bfloat16, step),
                         msg=lambda m: f"{where}: {m}")
            _assert_state_close(ours.state[p], ref.opt.state[r], torch.bfloat16, where)


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_fp32_state_for_bf16_params(cfg):
    for step, ours, params, ref in _run_pair(cfg, torch.bfloat16, dict(state_dtype=torch.float32),
                                             round_params_to=torch.bfloat16):
        for i, (p, r) in enumerate(zip(params, ref.params)):
            where = f"{cfg} step {step} param {i}"
            assert_close(p, r.to(torch.bfloat16), msg=lambda m: f"{where}: {m}")
            _assert_state_close(ours.state[p], ref.opt.state[r], torch.float32, where)


# ---------------------------------------------------------------------------
# Stochastic rounding
# ---------------------------------------------------------------------------

_M32 = np.uint64(0xFFFFFFFF)


def _mix32(x):
    x = x.astype(np.uint64) & _M32
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & _M32
    x ^= x >> np.uint64(16)
    return x


def _rounding_bits(position, group, step, n):
    """precision.h's stochastic_rounding_stream, _key and _bits, in NumPy."""
    stream = np.uint64(position) ^ _mix32(np.array([group + 0x3C6EF372]))
    s = np.uint64(step)
    key = (_mix32(np.array([(s & _M32) ^ np.uint64(0x243F6A88)]))
           + ((s >> np.uint64(32)) * np.uint64(0x85EBCA6B))
           + stream * np.uint64(0x9E3779B9)) & _M32
    key = _mix32(key)
    e = np.arange(n, dtype=np.uint64)
    inner = _mix32(((e & _M32) + (e >> np.uint64(32)) * np.uint64(0xC2B2AE35)) & _M32)
    return _mix32(key ^ inner)


def _round_stochastic(x: torch.Tensor, random: np.ndarray) -> torch.Tensor:
    u = x.contiguous().view(torch.int32).numpy().view(np.uint32).astype(np.uint64).reshape(-1)
    rounded = ((u + (random & np.uint64(0xFFFF))) & _M32) >> np.uint64(16)
    nan = (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
    out = np.where(nan, (u >> np.uint64(16)) | np.uint64(0x40), rounded).astype(np.uint16)
    return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).reshape(x.shape)


def test_stochastic_rounding_bits_match_precision_h():
    """SGD steps (no momentum, so the fp32 result is p - lr * g) on bf16
    params in two groups: every written bit is the documented stochastic
    rounding, each param's random stream named by its group and its
    position there, also at a step where the first param has no gradient
    (which moves every other param of its call one place)."""
    params = _params(torch.bfloat16)
    lr = 0.01
    opt = fused_optim.SGD([{"params": params[:2]}, {"params": params[2:]}], lr=lr,
                          stochastic_rounding=True)
    positions = [(0, 0), (0, 1)] + [(1, i) for i in range(len(params) - 2)]
    steps = [0] * len(params)
    for step, without_grad in ((1, None), (2, 0), (3, None)):
        grads = [_grad(p.shape, step, i).to(torch.bfloat16) for i, p in enumerate(params)]
        before = [p.detach().clone() for p in params]
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if i == without_grad else g
        opt.step()
        for t, (p, p0, g) in enumerate(zip(params, before, grads)):
            if t == without_grad:
                assert torch.equal(bits(p.detach()), bits(p0))
                continue
            steps[t] += 1
            exact = p0.float() + g.float() * torch.tensor(-lr, dtype=torch.float32)
            position, group = positions[t][1], positions[t][0]
            expected = _round_stochastic(exact, _rounding_bits(position, group, steps[t], p.numel()))
            assert torch.equal(bits(p.detach()), bits(expected)), f"step {step} tensor {t}"
            assert float(opt.state[p]["step"]) == steps[t]


def _sgd_call_rounding(params, grads, group_index, rounding_ids, entry):
    """One stochastically rounding sgd_ call (lr 0.01 in every group) on
    copies of ``params`` at step 1: the rounded params."""
    params = [p.detach().clone() for p in params]
    groups = max(group_index) + 1
    args = _ops.SIGNATURES["sgd_"].arguments(
        params=params, grads=list(grads), states={}, master_params=[],
        steps=[torch.tensor(0.0) for _ in params], group_index=list(group_index),
        lr=[0.01] * groups,
        hyper={"momentum": [0.0] * groups, "dampening": [0.0] * groups,
               "weight_decay": [0.0] * groups},
        group_flags={"maximize": [False] * groups}, new_state=[], grad_scale=None,
        found_inf=None, modes={"nesterov": False}, stochastic_rounding=True,
        rounding_ids=rounding_ids)
    call = _ops.OpCall("sgd_", False, args)
    if entry == "public":
        _ops.call_public(call)
    else:
        assert _ops.call_fast(call)
    return params


@pytest.mark.parametrize("entry", ["public", "fast"])
def test_rounding_ids_name_each_tensors_random_stream(entry):
    """A tensor's bits follow its rounding id, not its place in the call:
    alone with the id (1 << 32) | 2 it rounds as at position 2 of group 1
    in a call without ids, and not as at position 0 of group 0, which is
    the default id of a tensor alone."""
    params = [torch.randn(4099, generator=torch.Generator().manual_seed(i)).to(torch.bfloat16)
              for i in range(3)]
    grads = [_grad(p.shape, 1, i).to(torch.bfloat16) for i, p in enumerate(params)]
    together = _sgd_call_rounding(params, grads, [1, 1, 1], None, entry)
    alone = _sgd_call_rounding(params[2:], grads[2:], [0], [(1 << 32) | 2], entry)
    assert torch.equal(bits(alone[0]), bits(together[2]))
    default = _sgd_call_rounding(params[2:], grads[2:], [0], None, entry)
    assert torch.equal(bits(default[0]), bits(_sgd_call_rounding(
        params[2:], grads[2:], [0], [0], entry)[0]))
    # (4099 elements, each rounded up or down by its own bits: two streams
    # that agree everywhere would be the same stream)
    assert not torch.equal(bits(default[0]), bits(together[2]))


def test_stochastic_rounding_is_unbiased():
    """Updates far below half a bf16 ulp: round-to-nearest loses all of
    them, stochastic rounding keeps their sum in expectation."""
    n, steps, delta = 200_000, 20, 1e-3  # bf16 ulp at 1.0 is 2**-7 = 7.8e-3
    for rounding, expected in ((False, 1.0), (True, 1.0 + steps * delta)):
        p = torch.ones(n, dtype=torch.bfloat16, requires_grad=True)
        opt = fused_optim.SGD([p], lr=1.0, stochastic_rounding=rounding)
        for _ in range(steps):
            p.grad = torch.full((n,), -delta, dtype=torch.bfloat16)
            opt.step()
        mean = p.detach().double().mean().item()
        # per element a sum of bounded independent roundings: sd <= ulp/2
        # per step; 6 standard errors of the mean
        tol = 6 * (2**-7 / 2) * (steps**0.5) / n**0.5
        assert abs(mean - expected) < tol, (rounding, mean, expected)


def _sr_run(threads, name="AdamW"):
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        params = [torch.randn(s).to(torch.bfloat16).requires_grad_() for s in [(100_003,), (7,)]]
        opt = getattr(fused_optim, name)(params, lr=1e-3, stochastic_rounding=True)
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = _grad(p.shape, step, i).to(torch.bfloat16)
            opt.step()
        return [bits(p.detach()) for p in params]
    finally:
        torch.set_num_threads(old)


def test_stochastic_rounding_streams_differ_between_calls():
    """Two equal params in groups that differ in a mode flag (so in two op
    calls, each at position 0) round with different bits."""
    a, b = (torch.full((4099,), 1.0, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    opt = fused_optim.AdamW([{"params": [a]}, {"params": [b], "amsgrad": True}], lr=1e-3,
                            stochastic_rounding=True)
    for p in (a, b):
        p.grad = torch.full_like(p, 0.3)
    opt.step()
    assert not torch.equal(a, b)


@pytest.mark.parametrize("name", [n for n in OPTIMIZER_NAMES if n != "Adam"])  # (AdamW's op)
def test_stochastic_rounding_is_deterministic(name):
    """Same bits run after run, whatever the thread count."""
    a, b, c = _sr_run(1, name), _sr_run(1, name), _sr_run(2, name)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def _round_trip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_master_weights_survive_state_dict(cfg):
    """The float32 master copy and float32 moments come back exactly (torch's
    load_state_dict alone would cast them to the bf16 param dtype), and the
    run continues bit for bit as if uninterrupted."""
    kwargs = dict(master_weights=True)
    params = _params(torch.bfloat16)
    opt = cfg.ours_cls(params, **cfg.kwargs, **kwargs)
    twin_params = [p.detach().clone().requires_grad_() for p in params]
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = _grad(p.shape, step, i).to(torch.bfloat16)
        opt.step()
    sd = _round_trip(opt.state_dict())
    for st in sd["state"].values():
        assert st["master_param"].dtype == torch.float32
    with torch.no_grad():
        for t, p in zip(twin_params, params):
            t.copy_(p)
    twin = cfg.ours_cls(twin_params, **cfg.kwargs, **kwargs)
    twin.load_state_dict(sd)
    for p, t in zip(params, twin_params):
        for key, value in opt.state[p].items():
            assert torch.equal(bits(twin.state[t][key]), bits(value)), key
    for step in range(3, 6):
        for run_params, run in ((params, opt), (twin_params, twin)):
            for i, p in enumerate(run_params):
                p.grad = _grad(p.shape, step, i).to(torch.bfloat16)
            run.step()
        for p, t in zip(params, twin_params):
            assert torch.equal(bits(p.detach()), bits(t.detach()))


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_torch_checkpoint_into_master_weights_and_back(cfg):
    """A torch.optim checkpoint (bf16 state, no master copy) loads into a
    master-weights optimizer: the master is made from the params and the
    state is upcast. Ours saves a checkpoint that torch.optim loads."""
    params = _params(torch.bfloat16)
    ref = cfg.torch_cls(params, **{**cfg.kwargs, "foreach": False})
    for step in range(2):
        for i, p in enumerate(params):
            p.grad = _grad(p.shape, step, i).to(torch.bfloat16)
        ref.step()
    ours = cfg.ours_cls(params, **cfg.kwargs, master_weights=True)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))
    for i, p in enumerate(params):
        p.grad = _grad(p.shape, 2, i).to(torch.bfloat16)
    before = [p.detach().float() for p in params]
    ours.step()
    for p, p0 in zip(params, before):
        st = ours.state[p]
        assert st["master_param"].dtype == torch.float32
        assert all(v.dtype == torch.float32 for k, v in st.items()
                   if k not in ("step", "master_param"))
        assert not torch.equal(p.detach().float(), p0), "the step moved nothing"
    back = cfg.torch_cls(params, **{**cfg.kwargs, "foreach": False})
    back.load_state_dict(_round_trip(ours.state_dict()))
    for p in params:
        for key, value in back.state[p].items():
            # torch casts our fp32 state to its param dtype on load
            expected = ours.state[p][key]
            expected = expected if key == "step" else expected.to(p.dtype)
            assert torch.equal(bits(value), bits(expected)), key
    before = [p.detach().clone() for p in params]
    back.step()  # torch continues from our state
    assert any(not torch.equal(p, p0) for p, p0 in zip(params, before))


def _set_grads(params, step):
    for i, p in enumerate(params):
        p.grad = _grad(p.shape, step, i).to(p.dtype)


def _clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def _checkpoint_stepped_on_by_torch(cfg):
    """Ours with master weights for 3 steps, then torch.optim for 3 more
    from that checkpoint: (torch's params, torch's checkpoint, which holds
    our masters of step 3 in bf16, as torch keeps an unknown state key)."""
    params = _params(torch.bfloat16)
    ours = cfg.ours_cls(params, **cfg.kwargs, master_weights=True)
    for step in range(3):
        _set_grads(params, step)
        ours.step()
    torch_params = _clone_params(params)
    ref = cfg.torch_cls(torch_params, **{**cfg.kwargs, "foreach": False})
    ref.load_state_dict(_round_trip(ours.state_dict()))
    for step in range(3, 6):
        _set_grads(torch_params, step)
        ref.step()
    saved = _round_trip(ref.state_dict())
    assert all("master_param" in st for st in saved["state"].values())
    return torch_params, saved


def _without_masters(saved):
    saved = copy.deepcopy(saved)
    for st in saved["state"].values():
        del st["master_param"]
    return saved


def _resumed_with_and_without_the_masters(cfg):
    """[(ours, its params)] resumed from _checkpoint_stepped_on_by_torch,
    as saved and without its masters."""
    torch_params, saved = _checkpoint_stepped_on_by_torch(cfg)
    runs = []
    for checkpoint in (saved, _without_masters(saved)):
        params = _clone_params(torch_params)
        opt = cfg.ours_cls(params, **cfg.kwargs, master_weights=True)
        opt.load_state_dict(copy.deepcopy(checkpoint))
        runs.append((opt, params))
    return runs


def _assert_same_runs(a, a_params, b, b_params, where):
    for i, (p, q) in enumerate(zip(a_params, b_params)):
        assert torch.equal(bits(p.detach()), bits(q.detach())), f"{where}: param {i}"
        assert set(a.state[p]) == set(b.state[q])
        for key, value in a.state[p].items():
            assert torch.equal(bits(value), bits(b.state[q][key])), f"{where}: param {i} {key}"


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_master_behind_its_params_is_made_from_them(cfg):
    """Note [a loaded master copy]: a checkpoint whose master copies do not
    round to the params (torch.optim stepped on from ours) resumes from the
    params, as a checkpoint without masters does, not from the masters."""
    runs = _resumed_with_and_without_the_masters(cfg)
    for step in range(6, 8):
        for opt, params in runs:
            _set_grads(params, step)
            opt.step()
        _assert_same_runs(*runs[0], *runs[1], f"step {step}")


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_failed_first_step_after_a_load_checks_the_masters_again(cfg):
    runs = _resumed_with_and_without_the_masters(cfg)
    opt, params = runs[0]
    _set_grads(params, 6)
    params[-1].grad.data = torch.zeros(3, dtype=torch.bfloat16)  # (.data: the setter refuses it)
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, "failed step")
    for opt, params in runs:
        _set_grads(params, 6)
        opt.step()
    _assert_same_runs(*runs[0], *runs[1], "after the failed step")


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_master_loaded_before_the_model_weights_is_kept(cfg):
    """The optimizer's checkpoint loaded first, the model's after: the
    masters are checked at the step, where they round to the params, and
    kept (their low bits too): the run continues bit for bit."""
    params = _params(torch.bfloat16)
    opt = cfg.ours_cls(params, **cfg.kwargs, master_weights=True)
    for step in range(3):
        _set_grads(params, step)
        opt.step()
    twin_params = _params(torch.bfloat16, seed=11)  # (a fresh model)
    twin = cfg.ours_cls(twin_params, **cfg.kwargs, master_weights=True)
    twin.load_state_dict(_round_trip(opt.state_dict()))
    with torch.no_grad():
        for t, p in zip(twin_params, params):
            t.copy_(p)  # (the model's weights, loaded after)
    for step in range(3, 6):
        for run_params, run in ((params, opt), (twin_params, twin)):
            _set_grads(run_params, step)
            run.step()
        _assert_same_runs(opt, params, twin, twin_params, f"step {step}")


def test_adagrad_makes_its_masters_at_construction_and_checks_them_at_the_first_step():
    """As torch.optim.Adagrad, the whole state exists from construction on,
    the master copies too (a fresh optimizer's state_dict is the template
    torch.distributed.checkpoint loads into: test_distributed's flattened
    resume). Params written after construction (a model's weights loaded
    after its optimizer was built) are the truth at the first step, as for
    an optimizer built after the write, a param without a gradient at that
    step too (Note [a loaded master copy])."""
    kwargs = dict(lr=0.1, lr_decay=0.01, weight_decay=0.05, initial_accumulator_value=0.1,
                  master_weights=True)
    params = _params(torch.bfloat16)
    opt = fused_optim.Adagrad(params, **kwargs)
    for p in params:
        assert torch.equal(opt.state[p]["master_param"], p.detach().float())
    assert all("master_param" in state for state in opt.state_dict()["state"].values())
    written = _params(torch.bfloat16, seed=11)
    with torch.no_grad():
        for p, w in zip(params, written):
            p.copy_(w)
    twin_params = _clone_params(written)
    twin = fused_optim.Adagrad(twin_params, **kwargs)
    for step in range(3):
        for run_params, run in ((params, opt), (twin_params, twin)):
            _set_grads(run_params, step)
            if step == 0:
                run_params[-1].grad = None
            run.step()
        _assert_same_runs(opt, params, twin, twin_params, f"step {step}")


@pytest.mark.parametrize("cfg", [c for c in ONE_PER_OPTIMIZER if not c.unfused], ids=str)
@pytest.mark.parametrize("made_by", ["dcp_template_step", "dcp_template_step_then_copy",
                                     "copy_after_construction"])
def test_masters_made_before_the_weights_are_loaded_are_checked(cfg, made_by):
    """Note [a loaded master copy]: a master made by a step taken to create
    state (DCP's template step: lr 0, zero gradients) or at construction
    (Adagrad's) is checked at the next step, also in a copy of the
    optimizer: weights loaded into the model after it are the truth. The
    run is its twin's, whose masters are set to the loaded weights."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    pretrained = _params(torch.bfloat16, seed=11)

    def model_of(params):
        module = torch.nn.Module()
        for i, p in enumerate(params):
            module.register_parameter(f"p{i}", torch.nn.Parameter(p.detach().clone()))
        return module

    runs = []
    for is_twin in (False, True):
        model = model_of(_params(torch.bfloat16))
        opt = cfg.ours_cls(model.parameters(), **cfg.kwargs, master_weights=True)
        if made_by.startswith("dcp_template_step"):
            get_optimizer_state_dict(model, opt)
            assert all("master_param" in opt.state[p] for p in model.parameters())
        if "copy" in made_by and not is_twin:
            model, opt = copy.deepcopy((model, opt))
        with torch.no_grad():
            for p, w in zip(model.parameters(), pretrained):
                p.copy_(w)
        if is_twin:  # (its masters made from the loaded weights)
            for p in model.parameters():
                if "master_param" in opt.state[p]:
                    opt.state[p]["master_param"].copy_(p.detach())
        runs.append((model, opt))
    (model, opt), (twin, twin_opt) = runs
    for step in range(3):
        for run_model, run in ((model, opt), (twin, twin_opt)):
            _set_grads(list(run_model.parameters()), step)
            run.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q), f"step {step}"
            assert torch.equal(opt.state[p]["master_param"], twin_opt.state[q]["master_param"])


def _train_three_steps(model, opt):
    torch.manual_seed(1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 8, dtype=torch.bfloat16)).float().square().mean().backward()
        opt.step()


def test_adagrad_share_memory_shares_the_master_copies():
    # Hogwild (torch's Adagrad.share_memory, then processes stepping the
    # shared model): the master copy is what the step reads, so it is
    # shared with the sums; a private one would overwrite each process's
    # params from its own. Here one child process trains and the parent
    # sees exactly what training in-process gives. (spawn, not fork: a
    # fork of a process whose thread pools have run can hang.)
    def build():
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8).to(torch.bfloat16)
        return model, fused_optim.Adagrad(model.parameters(), lr=0.1, master_weights=True)

    model, opt = build()
    model.share_memory()
    opt.share_memory()
    for p in model.parameters():
        assert all(opt.state[p][k].is_shared() for k in ("sum", "master_param"))
    child = torch.multiprocessing.get_context("spawn").Process(
        target=_train_three_steps, args=(model, opt), daemon=True)
    child.start()
    child.join(300)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0
    twin, twin_opt = build()
    _train_three_steps(twin, twin_opt)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key in ("sum", "master_param"):
            assert torch.equal(opt.state[p][key], twin_opt.state[q][key]), key


@pytest.mark.parametrize("name", ["bfloat16", "torch.bfloat16"])
def test_state_dtype_by_name(name):
    # A config file's name, or the name a saved group holds, which wrappers
    # (ZeRO's load, torch's swap-in) copy into a live group: as the dtype.
    params = _params(torch.float32)
    opt = fused_optim.AdamW(params, lr=1e-2, state_dtype=name)
    assert opt.defaults["state_dtype"] is torch.bfloat16
    extra = _params(torch.float32, seed=5)
    opt.add_param_group({"params": extra, "state_dtype": "torch.float32"})
    opt.param_groups[0]["state_dtype"] = name  # (as a wrapper's copy leaves it)
    _set_grads(params + extra, 0)
    opt.step()
    assert all(opt.state[p]["exp_avg"].dtype == torch.bfloat16 for p in params)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in extra)
    with pytest.raises(ValueError, match="got 'float16'"):
        fused_optim.AdamW(params, state_dtype="float16")


def test_changing_state_dtype_converts_the_state():
    params = _params(torch.float32)
    opt = fused_optim.AdamW(params, lr=1e-2)
    for step in range(2):
        for i, p in enumerate(params):
            p.grad = _grad(p.shape, step, i)
        opt.step()
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    opt.step()
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == torch.bfloat16
        assert opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16


# ---------------------------------------------------------------------------
# A param turned bf16/fp16 keeps its float32 state (Note [state kept wide])
# ---------------------------------------------------------------------------

# torch.optim's code keeps float32 state where a param turns bf16/fp16 and
# goes on updating it (its Adam family raises: lerp of mixed dtypes).
# (Without weight decay: torch adds it to the gradient in the gradient's
# dtype, a rounding our fp32 math does not make; every option is compared
# against state_dtype=torch.float32 below.)
KEPT_BY_TORCH = [
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.5)),
]
# When the params are cast: right after the optimizer is built (Adagrad's
# sums exist then), after steps (the step's kept plan), or after steps and
# a resume (a new optimizer loads the state: the plan is made anew).
CASTS = {"built": 0, "stepped": 3, "resumed": 3}


def _run_cast_after_steps(cls, kwargs, dtype, steps=12, compiled=False, extra=False,
                          when="stepped"):
    """Builds ``cls`` on float32 params, steps CASTS[when] times (and with
    ``when="resumed"`` builds a new one that loads the state dict), casts
    every param to ``dtype`` in place (``model.to(dtype)``), then steps on;
    with ``extra``, a param of ``dtype`` without state joins the group at
    the cast. Returns (optimizer, params)."""
    params = _params(torch.float32)
    opt = cls(params, **kwargs)
    for s in range(steps):
        if s == CASTS[when]:
            if when == "resumed":
                saved = opt.state_dict()
                opt = cls(params, **kwargs)
                opt.load_state_dict(saved)
            for p in params:
                p.data = p.data.to(dtype)
            if extra:
                new = torch.randn(37, generator=torch.Generator().manual_seed(5))
                params.append(new.to(dtype).requires_grad_())
                opt.param_groups[0]["params"].append(params[-1])
            step = torch.compile(opt.step) if compiled else opt.step
        for i, p in enumerate(params):
            p.grad = _grad(p.shape, s, i).to(p.dtype)
        (opt.step if s < CASTS[when] else step)()
    return opt, params


# (cast right after building: only Adagrad has state then; the others'
# state is made in the param's dtype, where torch's bf16 arithmetic rounds
# more often than ours: the low-precision tests compare that)
CAST_CASES = [(name, kwargs, when) for name, kwargs in KEPT_BY_TORCH for when in sorted(CASTS)
              if when != "built" or name == "Adagrad"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name, kwargs, when", CAST_CASES,
                         ids=[f"{name}-{when}" for name, _, when in CAST_CASES])
def test_param_cast_keeps_float32_state_as_torch(name, kwargs, when, dtype):
    ours, params = _run_cast_after_steps(getattr(fused_optim, name), kwargs, dtype, when=when)
    ref, ref_params = _run_cast_after_steps(getattr(torch.optim, name),
                                            dict(kwargs, foreach=False), dtype, when=when)
    for i, (p, r) in enumerate(zip(params, ref_params)):
        where = f"{name} {dtype} param {i}"
        assert p.dtype == r.dtype == dtype, where
        assert_close(p, r, msg=lambda m: f"{where}: {m}")
        for key, value in ref.state[r].items():
            got = ours.state[p][key]
            assert got.dtype == value.dtype, f"{where} {key}: {got.dtype} != torch's {value.dtype}"
            assert_close(got, value, msg=lambda m: f"{where} {key}: {m}")


def test_adagrad_sum_kept_float32_goes_on_growing():
    # The harm of narrowing: a bf16 sum of squared unit gradients stops at
    # 256, and the update stays lr / 16 where torch's shrinks as lr / sqrt(n).
    p = torch.nn.Parameter(torch.zeros(5))
    opt = fused_optim.Adagrad([p], lr=0.1)  # (its sum exists from here on, in float32)
    p.data = p.data.bfloat16()
    for _ in range(400):
        p.grad = torch.ones(5, dtype=torch.bfloat16)
        opt.step()
    assert opt.state[p]["sum"].dtype == torch.float32
    assert torch.equal(opt.state[p]["sum"], torch.full((5,), 400.0))


@pytest.mark.parametrize("when", ["stepped", "resumed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_param_cast_is_stored_as_float32_state_asks(cfg, dtype, when):
    # Every optimizer (torch's Adam family refuses the cast params): the
    # state stays float32 and the steps are those of state_dtype=float32,
    # bit for bit; a param without state that joins the group then gets
    # state in its own dtype, beside them.
    kept, params = _run_cast_after_steps(cfg.ours_cls, cfg.kwargs, dtype, when=when)
    asked, asked_params = _run_cast_after_steps(
        cfg.ours_cls, dict(cfg.kwargs, state_dtype=torch.float32), dtype, when=when)
    for i, (p, a) in enumerate(zip(params, asked_params)):
        where = f"{cfg} {dtype} param {i}"
        assert torch.equal(bits(p.detach()), bits(a.detach())), where
        for key, value in asked.state[a].items():
            assert torch.equal(kept.state[p][key], value), f"{where} {key}"
            assert kept.state[p][key].dtype == value.dtype, f"{where} {key}"
    joined, params = _run_cast_after_steps(cfg.ours_cls, cfg.kwargs, dtype, extra=True, when=when)
    assert all(joined.state[p][key].dtype == torch.float32 for p in params[:-1]
               for key in asked.state[asked_params[0]] if key not in ("step", "master_param"))
    new = joined.state[params[-1]]
    tensors = [v for k, v in new.items() if torch.is_tensor(v) and v.dim() and k != "master_param"]
    assert tensors and all(t.dtype == dtype for t in tensors), {k: v.dtype for k, v in new.items()}


def test_a_state_dtype_option_still_narrows_and_a_load_still_casts():
    opt, params = _run_cast_after_steps(fused_optim.Adam, dict(lr=0.01), torch.bfloat16, steps=5)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in params)
    saved = copy.deepcopy(opt.state_dict())
    # a load casts the state to the params' dtype, as torch.optim's does
    fresh = fused_optim.Adam(params, lr=0.01)
    fresh.load_state_dict(saved)
    assert all(fresh.state[p][k].dtype == torch.bfloat16 for p in params
               for k in ("exp_avg", "exp_avg_sq"))
    # the option converts: it asks for it
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    for i, p in enumerate(params):
        p.grad = _grad(p.shape, 9, i).bfloat16()
    opt.step()
    assert all(opt.state[p][k].dtype == torch.bfloat16 for p in params
               for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("name", ["Adagrad", "Adam"])
def test_compiled_step_keeps_float32_state_as_the_eager_step(name):
    kwargs = dict(lr=torch.tensor(0.01))  # (torch's compiled-optimizer recipe)
    eager, params = _run_cast_after_steps(getattr(fused_optim, name), kwargs, torch.bfloat16,
                                          steps=6, extra=True)
    traced, traced_params = _run_cast_after_steps(getattr(fused_optim, name), kwargs,
                                                  torch.bfloat16, steps=6, compiled=True,
                                                  extra=True)
    for i, (p, t) in enumerate(zip(params, traced_params)):
        assert torch.equal(bits(p.detach()), bits(t.detach())), f"{name} param {i}"
        for key, value in eager.state[p].items():
            assert traced.state[t][key].dtype == value.dtype, f"{name} param {i} {key}"
            assert torch.equal(traced.state[t][key], value), f"{name} param {i} {key}"
    first = {"Adagrad": "sum", "Adam": "exp_avg"}[name]
    assert eager.state[params[0]][first].dtype == torch.float32  # (kept)
    assert eager.state[params[-1]][first].dtype == torch.bfloat16  # (made for the joined param)


# ---------------------------------------------------------------------------
# Errors: clear, and nothing written
# ---------------------------------------------------------------------------

CONSTRUCTOR_ERRORS = [
    (dict(state_dtype=torch.float16), "state_dtype must be None, torch.float32 or torch.bfloat16"),
    (dict(state_dtype=torch.float64), "state_dtype must be"),
    (dict(master_weights=True, stochastic_rounding=True), "exclude each other"),
]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("kwargs,match", CONSTRUCTOR_ERRORS)
def test_constructor_errors(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(fused_optim, name)([torch.zeros(2, requires_grad=True)], **kwargs)


# (the defaults, the new group's options, the constructor's message)
GROUP_ERRORS = {
    "rounding_and_defaults_master": (dict(master_weights=True), dict(stochastic_rounding=True),
                                     "exclude each other"),
    "fp16_state": ({}, dict(state_dtype=torch.float16), "state_dtype must be None"),
    "negative_max_grad_norm": ({}, dict(max_grad_norm=-1.0), "Invalid max_grad_norm value"),
    "master_on_torchs_path": ({}, dict(differentiable=True, master_weights=True),
                              "need\\(s\\) the fused step"),
}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("case", sorted(GROUP_ERRORS))
def test_add_param_group_checks_our_options_as_the_constructor(name, case):
    # torch.optim checks no option in add_param_group; ours refuses what the
    # constructor refuses, before the group is added (a step would refuse
    # it later), also for a group given to the constructor.
    defaults, options, match = GROUP_ERRORS[case]
    if "differentiable" in options and name in NOT_IN_TORCH:
        options = dict(caution=True, master_weights=True) if name != "Lars" else None
        if options is None:
            pytest.skip("Lars has no unfused option")
    cls = getattr(fused_optim, name)
    opt = cls([torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)], lr=0.01, **defaults)
    snap = snapshot_optimizer(opt)  # (Adagrad's state is made by the constructor)
    added = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match=f"^fused_optim.{name}: .*{match}"):
        opt.add_param_group({"params": [added], **options})
    assert_optimizer_unchanged(opt, snap, "refused group")
    assert added not in opt.state
    with pytest.raises(ValueError, match=match):
        cls([{"params": [added], **options}], lr=0.01, **defaults)


def test_precision_option_edited_into_a_group_is_refused_at_the_step():
    params = [torch.randn(4, dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    opt = fused_optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=0.01)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[1]["state_dtype"] = torch.float16
    snap = snapshot_optimizer(opt)
    with pytest.raises(ValueError, match="^fused_optim.AdamW: state_dtype must be None"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, "refused step")


STEP_ERRORS = [
    ("fp64_bf16_state", torch.float64, dict(state_dtype=torch.bfloat16), "state_dtype"),
    ("fp16_stochastic", torch.float16, dict(stochastic_rounding=True), "stochastic_rounding"),
]


@pytest.mark.parametrize("case", STEP_ERRORS, ids=lambda c: c[0])
def test_step_errors_write_nothing(case):
    _, bad_dtype, kwargs, match = case
    good = _params(torch.float32)
    bad = torch.randn(5, dtype=bad_dtype, requires_grad=True)
    opt = fused_optim.Adam([{"params": good}, {"params": [bad], **kwargs}], lr=0.1)
    for i, p in enumerate(good):
        p.grad = _grad(p.shape, 0, i)
    opt.step()
    snap = snapshot_optimizer(opt)
    for p in good + [bad]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_optimizer_unchanged(opt, snap, case[0])


def _adam_op(params, grads, states, master, *, stochastic_rounding=False):
    steps = [torch.tensor(0.0) for _ in params]
    torch.ops.fused_optim.adam_(
        params=params, grads=grads, exp_avgs=states[0], exp_avg_sqs=states[1],
        max_exp_avg_sqs=[], master_params=master, state_steps=steps,
        group_index=[0] * len(params), lr=[1e-3], beta1=[0.9], beta2=[0.999], eps=[1e-8],
        weight_decay=[0.0], maximize=[False], decoupled_weight_decay=[False],
        max_grad_norm=[float("inf")], grad_scale=None, found_inf=None, grad_norm=None,
        amsgrad=False, stochastic_rounding=stochastic_rounding)


OP_ERRORS = {
    "state_dtypes_differ": (torch.float32, [torch.bfloat16, torch.float32], False, False,
                            "must have the dtype of the other state tensors"),
    "fp16_state_for_fp32": (torch.float32, [torch.float16, torch.float16], False, False,
                            "must be float32, bfloat16 or the params' dtype"),
    "master_for_fp32": (torch.float32, [torch.float32] * 2, True, False,
                        "master weights\\) are for float16 and bfloat16"),
    "sr_for_fp32": (torch.float32, [torch.float32] * 2, False, True,
                    "stochastic_rounding is for bfloat16"),
    "sr_with_master": (torch.bfloat16, [torch.float32] * 2, True, True, "exclude each other"),
}


@pytest.mark.parametrize("case", OP_ERRORS, ids=str)
def test_op_rejects_bad_precision_before_writing(case):
    dtype, state_dtypes, with_master, rounding, match = OP_ERRORS[case]
    params = [torch.randn(9).to(dtype) for _ in range(2)]
    grads = [torch.randn(9).to(dtype) for _ in range(2)]
    states = [[torch.rand(9).to(d) for _ in range(2)] for d in state_dtypes]
    master = [p.float() for p in params] if with_master else []
    before = [bits(t) for t in params + grads + states[0] + states[1] + master]
    with pytest.raises(RuntimeError, match=match):
        _adam_op(params, grads, states, master, stochastic_rounding=rounding)
    after = [bits(t) for t in params + grads + states[0] + states[1] + master]
    assert all(torch.equal(a, b) for a, b in zip(after, before))


# ---------------------------------------------------------------------------
# The schema: opcheck with every shared argument in use
# ---------------------------------------------------------------------------

OPCHECK_CASES = {
    # (param dtype, state dtype, master weights, stochastic rounding, AMP)
    "bf16_master_fp32_state_amp": (torch.bfloat16, torch.float32, True, False, True),
    "bf16_bf16_state_stochastic": (torch.bfloat16, torch.bfloat16, False, True, False),
    "fp32_bf16_state_amp": (torch.float32, torch.bfloat16, False, False, True),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("case", OPCHECK_CASES, ids=str)
def test_opcheck_mixed_precision(case, tensor_lr):
    """Mutation annotations hold when grads (AMP unscale) and master weights
    are written too, in both overloads (lr floats, or read from tensors)."""
    dtype, state_dtype, master, rounding, amp = OPCHECK_CASES[case]
    shapes = [(7,), (4099,), (3, 5)]
    params = [torch.randn(s).to(dtype) for s in shapes]
    grads = [torch.randn(s).to(dtype) for s in shapes]
    states = [[torch.rand(s).to(state_dtype) for s in shapes] for _ in range(2)]
    masters = [p.float() for p in params] if master else []
    steps = [torch.tensor(float(i)) for i in range(len(shapes))]
    signature = _ops.SIGNATURES["adam_"]
    values = signature.arguments(
        params=params, grads=grads, states={"exp_avgs": states[0], "exp_avg_sqs": states[1]},
        master_params=masters, steps=steps, group_index=[0, 1, 0],
        lr=[torch.tensor(1e-2), torch.tensor([1e-3], dtype=torch.float64)] if tensor_lr
        else [1e-2, 1e-3],
        hyper={"beta1": [0.9, 0.8], "beta2": [0.999, 0.99], "eps": [1e-8, 1e-6],
               "weight_decay": [0.0, 0.1]},
        group_flags={"maximize": [True, False], "decoupled_weight_decay": [False, True]},
        new_state=None, grad_scale=torch.tensor([1024.0]) if amp else None,
        found_inf=torch.tensor([0.0]) if amp else None, modes={"amsgrad": False},
        stochastic_rounding=rounding)
    args = values[:signature.num_positional]
    kwargs = dict(zip(signature.keywords, values[signature.num_positional:]))
    op = torch.ops.fused_optim.adam_.tensor_lr if tensor_lr else torch.ops.fused_optim.adam_.default
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("options", [dict(state_dtype=torch.bfloat16), "amp"], ids=str)
def test_sparse_grad_with_precision_options_rejected_atomically(options):
    """Sparse gradients take torch's unfused path, which has none of these:
    a clear error, raised before any bucket (the dense float16 one first in
    plan order here) is stepped."""
    dense = torch.randn(6, dtype=torch.float16, requires_grad=True)
    table = torch.randn(10, 3, requires_grad=True)
    kwargs = options if isinstance(options, dict) else {}
    opt = fused_optim.SGD([dense, table], lr=0.1, **kwargs)
    dense.grad = torch.ones_like(dense)
    table.grad = torch.sparse_coo_tensor([[1, 4]], torch.ones(2, 3), (10, 3))
    if options == "amp":
        opt.grad_scale, opt.found_inf = torch.tensor([1.0]), torch.tensor([0.0])
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="sparse gradients are not supported with"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, str(options))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sgd_master_weights_without_momentum(dtype):
    # SGD without momentum keeps no other state: the master copy is still
    # made (it was not, and every step raised KeyError), and the run equals
    # float32 SGD on the master rounded to the param dtype.
    torch.manual_seed(0)
    p = torch.randn(1000, dtype=dtype, requires_grad=True)
    ref = p.detach().float().clone().requires_grad_()
    opt = fused_optim.SGD([p], lr=0.1, weight_decay=0.01, master_weights=True)
    ref_opt = torch.optim.SGD([ref], lr=0.1, weight_decay=0.01, foreach=False)
    for step in range(5):
        g = _grad(p.shape, step, 0).to(dtype)
        p.grad, ref.grad = g, g.float()
        opt.step()
        ref_opt.step()
    master = opt.state[p]["master_param"]
    assert master.dtype == torch.float32
    torch.testing.assert_close(master, ref.detach())
    assert torch.equal(p.detach(), master.to(dtype))
