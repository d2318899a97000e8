"""Property-based tests (hypothesis).

The rule of Note [validate before mutating], over random optimizers,
options, param groups, dtypes, layouts and a random bad input injected at a
random step: the step that raises leaves every param, gradient, state
tensor, step counter and group option bit-identical to before, and after
the input is repaired the next step equals that of a run that never failed,
bit for bit.

Examples are derandomized (the same ones every run, so CI is stable);
EXAMPLES of them run in CI. Set FUSED_OPTIM_HYPOTHESIS_EXAMPLES to run
more, e.g. 5000 locally.
"""

from __future__ import annotations

import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fused_optim  # noqa: E402
from harness import assert_optimizer_unchanged, bits, snapshot_optimizer  # noqa: E402
from optim_configs import OPTIMIZER_NAMES, ROW, SPARSE_OK, torch_class  # noqa: E402

EXAMPLES = int(os.environ.get("FUSED_OPTIM_HYPOTHESIS_EXAMPLES", "400"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


class _HypothesisChooser:
    """A row's Chooser over hypothesis's ``draw`` (optim_configs.Chooser)."""

    def __init__(self, draw) -> None:
        self.draw = draw

    def choice(self, values):
        return self.draw(st.sampled_from(values))

    def chance(self, p: float) -> bool:
        return self.draw(st.booleans())


@st.composite
def options(draw, name):
    o = {"lr": draw(st.sampled_from([1e-3, 0.05, 0.5]))}
    o["weight_decay"] = draw(st.sampled_from([0.0, 0.01]))
    o["maximize"] = draw(st.booleans())
    ROW[name].property_options(_HypothesisChooser(draw), o)
    return o


# (param dtype, precision options of its group)
STORAGE = [
    (torch.float32, {}),
    (torch.float64, {}),
    (torch.float32, {"state_dtype": torch.bfloat16}),
    (torch.bfloat16, {"master_weights": True}),
    (torch.bfloat16, {"stochastic_rounding": True}),
    (torch.float16, {}),
]
LAYOUTS = ["contiguous", "transposed", "sliced"]


def _make_param(shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "transposed":
        t = torch.randn(shape[::-1], generator=g).t()
    elif layout == "sliced":
        t = torch.randn(shape[0], shape[1] * 2, generator=g)[:, ::2]
    else:
        t = torch.randn(shape, generator=g)
    return torch.nn.Parameter(t.to(dtype))


@st.composite
def setups(draw):
    name = draw(st.sampled_from(OPTIMIZER_NAMES))
    base = draw(options(name))
    groups = []
    for gi in range(draw(st.integers(1, 3))):
        dtype, precision = draw(st.sampled_from(STORAGE))
        specs = [(draw(st.sampled_from([(1, 1), (3, 5), (17, 9)])), draw(st.sampled_from(LAYOUTS)))
                 for _ in range(draw(st.integers(1, 3)))]
        overrides = draw(options(name)) if draw(st.booleans()) else {}
        groups.append((dtype, precision, specs, overrides))
    good_steps = draw(st.integers(0, 2))
    bad = draw(st.sampled_from(BAD_INPUTS))
    target = draw(st.integers(0, 100))
    return name, base, groups, good_steps, bad, target


def _build(name, base, groups):
    seed = 0
    param_groups = []
    for dtype, precision, specs, overrides in groups:
        params = []
        for shape, layout in specs:
            params.append(_make_param(shape, layout, dtype, seed))
            seed += 1
        param_groups.append({"params": params, **overrides, **precision})
    return getattr(fused_optim, name)(param_groups, **base)


def _grads(opt, step):
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        gen = torch.Generator().manual_seed(10_000 * step + i)
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


# ----- bad inputs: each returns an undo function, or None where it does not apply ----------


def _pick(opt, target, where=lambda p, g: True):
    pairs = [(p, g) for g in opt.param_groups for p in g["params"] if where(p, g)]
    return pairs[target % len(pairs)] if pairs else (None, None)


def grad_wrong_dtype(opt, target):
    p, _ = _pick(opt, target)
    good = p.grad
    p.grad = good.clone()
    p.grad.data = torch.zeros(p.shape, dtype=torch.float64 if p.dtype != torch.float64 else torch.float32)
    return lambda: setattr(p, "grad", good)


def grad_wrong_shape(opt, target):
    p, _ = _pick(opt, target)
    good = p.grad
    p.grad = good.clone()
    p.grad.data = torch.zeros(p.numel() + 1, dtype=p.dtype)
    return lambda: setattr(p, "grad", good)


def sparse_grad(opt, target):
    # refused by Adam, AdamW, RMSprop; by SGD and Adagrad with weight decay
    # or our precision options
    p, g = _pick(opt, target)
    name = type(opt).__name__
    if name in SPARSE_OK and g["weight_decay"] == 0 and p.dtype != torch.bfloat16 \
            and g.get("state_dtype") is None:
        g_old = g["weight_decay"]
        g["weight_decay"] = 0.01
        restore_wd = lambda: g.__setitem__("weight_decay", g_old)  # noqa: E731
    else:
        restore_wd = lambda: None  # noqa: E731
    good = p.grad
    p.grad = good.to_sparse()
    return lambda: (setattr(p, "grad", good), restore_wd())


def state_wrong_shape(opt, target):
    candidates = [(p, k) for p, s in opt.state.items() for k, v in s.items()
                  if torch.is_tensor(v) and v.dim() > 0]
    if not candidates:
        return None
    p, key = candidates[target % len(candidates)]
    good = opt.state[p][key]
    opt.state[p][key] = torch.zeros(good.numel() + 2, dtype=good.dtype)
    return lambda: opt.state[p].__setitem__(key, good)


def expanded_param(opt, target):
    p, _ = _pick(opt, target, lambda p, g: p.numel() > 1)
    if p is None:
        return None
    good = p.data
    p.data = good.reshape(-1)[:1].expand(p.shape)
    return lambda: setattr(p, "data", good)


def overlapping_params(opt, target):
    # two params of the same group, shape and dtype made views of one buffer
    for g in opt.param_groups:
        ps = g["params"]
        for i in range(len(ps)):
            for j in range(i + 1, len(ps)):
                if ps[i].shape == ps[j].shape and ps[i].numel() > 1:
                    good = ps[j].data
                    ps[j].data = ps[i].data
                    return lambda p=ps[j], good=good: setattr(p, "data", good)
    return None


def bad_group_option(opt, target):
    # options that are refused at the step for this group's params
    _, g = _pick(opt, target)
    dtypes = {p.dtype for p in g["params"]}
    if torch.float64 in dtypes:
        changes = {"state_dtype": torch.bfloat16}
    elif torch.float16 in dtypes:
        changes = {"stochastic_rounding": True}
    elif g.get("master_weights") or g.get("state_dtype") or g.get("stochastic_rounding"):
        changes = {"fused": False}  # torch's code has no precision options
    else:
        changes = {"fused": False, "master_weights": True}
    _MISSING = object()
    old = {k: g.get(k, _MISSING) for k in changes}
    g.update(changes)

    def undo():
        for k, v in old.items():
            if v is _MISSING:
                del g[k]
            else:
                g[k] = v
    return undo


BAD_INPUTS = [grad_wrong_dtype, grad_wrong_shape, sparse_grad, state_wrong_shape,
              expanded_param, overlapping_params, bad_group_option]


def _grad_bits(opt):
    return [None if p.grad is None else (p.grad.layout, bits(p.grad.to_dense()))
            for g in opt.param_groups for p in g["params"]]


@SETTINGS
@given(setups())
def test_a_step_that_raises_changes_nothing(setup):
    name, base, groups, good_steps, bad, target = setup
    opt, twin = _build(name, base, groups), _build(name, base, groups)
    for step in range(good_steps):
        for o in (opt, twin):
            _grads(o, step)
            o.step()
    _grads(opt, good_steps)
    _grads(twin, good_steps)
    undo = bad(opt, target)
    hypothesis.event(f"{bad.__name__}{'' if undo else ' (does not apply)'}")
    if undo is None:
        return  # this bad input does not apply to this setup
    snap, grads = snapshot_optimizer(opt), _grad_bits(opt)
    with pytest.raises((RuntimeError, ValueError)):
        opt.step()
    assert_optimizer_unchanged(opt, snap, f"{bad.__name__}")
    for a, b in zip(_grad_bits(opt), grads):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), "a gradient was written"
    undo()
    opt.step()
    twin.step()
    for p, q in zip((p for g in opt.param_groups for p in g["params"]),
                    (q for g in twin.param_groups for q in g["params"])):
        assert torch.equal(bits(p), bits(q)), f"after {bad.__name__}: differs from a run that never failed"
    twin_snap = snapshot_optimizer(twin)
    assert_optimizer_unchanged(opt, {**twin_snap, "param_ids": [id(p) for g in opt.param_groups
                                                                for p in g["params"]]},
                               "state after recovery")


# ----- parity with torch.optim's for-loop over random valid configurations ---------------------

# Recorded: the seed and the number of examples CI runs (derandomized runs
# of this seed; FUSED_OPTIM_HYPOTHESIS_EXAMPLES raises the count,
# FUSED_OPTIM_PARITY_SEED changes the seed). Also run by hand on 2026-12-03,
# all passing: this seed with 3,000 examples, seeds 1 and 2 with 2,000 each,
# and 2,000 RMSprop-only examples; on 2026-12-07 this seed's 3,000 found a
# bf16 Lion sign flip (the storage model in _parity_runs), then passed, as
# did seeds 1 and 2 with 2,000 each.
PARITY_SEED = int(os.environ.get("FUSED_OPTIM_PARITY_SEED", "20261203"))
PARITY_EXAMPLES = int(os.environ.get("FUSED_OPTIM_HYPOTHESIS_EXAMPLES", "300"))


@st.composite
def parity_setups(draw):
    name = draw(st.sampled_from(OPTIMIZER_NAMES))
    kw = {"lr": draw(st.sampled_from([1e-4, 0.01, 0.3, 1.0, 10.0])),
          "weight_decay": draw(st.sampled_from([0.0, 0.1, 1.0])),
          "maximize": draw(st.booleans())}
    eps = draw(st.sampled_from([1e-12, 1e-8, 1e-3]))
    row = ROW[name]
    row.parity_options(_HypothesisChooser(draw), kw, eps)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    sizes = draw(st.lists(st.sampled_from([1, 7, 16, 33, 1031]), min_size=1, max_size=3))
    grad_scale = draw(st.sampled_from([1e-6, 1.0, 1e3]))
    steps = draw(st.integers(1, 10))
    # Ill-posed corners are left out, where the result is the rounding
    # noise of one particular operation order, not a property of the math:
    # decoupled decay with lr * weight_decay > 1 multiplies the params by a
    # negative factor every step (exponential growth, sign flips), and each
    # row's own (OptimizerRow.parity_ill_posed).
    hypothesis.assume(not (row.decoupled(kw) and kw["lr"] * kw["weight_decay"] > 1))
    hypothesis.assume(not row.parity_ill_posed(kw))
    # fp16 / bf16 are compared with float64 (2x torch's distance), which is
    # meaningful where a step is not ruled by one rounding: with lr near 1
    # an Adam step divides by sqrt(v), turning v's last-ulp luck into an
    # error larger than torch's on some seeds and smaller on others, and
    # 1e-6 gradients are subnormal or zero in these dtypes. The extremes are
    # exercised in fp32 and fp64.
    if dtype in (torch.float16, torch.bfloat16):
        hypothesis.assume(kw["lr"] <= 0.01 and grad_scale >= 1.0)
    return name, kw, dtype, sizes, grad_scale, steps


class IEEESqrt(torch.overrides.TorchFunctionMode):
    """torch's sqrt, correctly rounded as IEEE 754 asks (and as ours is).

    torch 2.13's CPU sqrt is not: about 15% of float32 and 1% of float64
    results are one ulp off (test_reference_sqrt_is_not_correctly_rounded).
    With alpha 0.9999, eps 1e-12 and tiny gradients RMSprop's lr / sqrt(v)
    turns that ulp into differences far above assert_close's tolerances, so
    the reference runs torch.optim's own code with this sqrt. float32 is
    rounded once from the float64 root (exact: 53 >= 2 * 24 + 2 bits);
    float64 comes from numpy, whose sqrt is the IEEE instruction.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.sqrt, torch.Tensor.sqrt, torch.Tensor.sqrt_) and not kwargs:
            x = args[0]
            if x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
                root = correctly_rounded_sqrt(x)
                return x.copy_(root) if func is torch.Tensor.sqrt_ else root
        return func(*args, **kwargs)


def correctly_rounded_sqrt(x: torch.Tensor) -> torch.Tensor:
    import numpy as np
    wide = x.detach().cpu().double().numpy()  # float32 -> float64 is exact
    return torch.from_numpy(np.sqrt(wide)).to(dtype=x.dtype, device=x.device)


def test_reference_sqrt_is_not_correctly_rounded():
    # Why IEEESqrt exists; fails (and IEEESqrt can go) once torch's sqrt is
    # correctly rounded.
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0)) * 10
    assert not torch.equal(x.sqrt(), correctly_rounded_sqrt(x))
    with IEEESqrt():
        assert torch.equal(x.sqrt(), correctly_rounded_sqrt(x))


def _parity_runs(name, kw, dtype, sizes, grad_scale, steps):
    """(ours, torch's for-loop, torch's for-loop in float64, and for fp16 /
    bf16 the storage model): final params and states, from the same
    dtype-representable start and gradients. The storage model is torch's
    for-loop in float64 with the params and their dense state rounded to
    ``dtype`` after each step: the math exact, the values stored as ours
    stores them (rounded once per step); None for float32 / float64."""
    low = dtype in (torch.float16, torch.bfloat16)
    out = []
    runs = [(getattr(fused_optim, name), dtype, False), (torch_class(name), dtype, False),
            (torch_class(name), torch.float64, False)]
    for cls, run_dtype, stored in runs + ([(torch_class(name), torch.float64, True)] if low else []):
        params = []
        for i, n in enumerate(sizes):
            g = torch.Generator().manual_seed(i)
            start = (torch.randn(n, generator=g) * (0.1 if low else 1.0)).to(dtype)
            params.append(torch.nn.Parameter(start.to(run_dtype)))
        ours = cls.__module__.startswith("fused_optim")
        opt = cls(params, **kw, **({} if ours else {"foreach": False}))
        for step in range(steps):
            for i, p in enumerate(params):
                g = torch.Generator().manual_seed(1000 * step + i)
                p.grad = (torch.randn(p.shape, generator=g) * grad_scale).to(dtype).to(run_dtype)
            if ours:
                opt.step()
            else:
                with IEEESqrt():
                    opt.step()
            if stored:
                with torch.no_grad():
                    for p in params:
                        p.copy_(p.to(dtype))
                        for v in opt.state[p].values():
                            if torch.is_tensor(v) and v.is_floating_point() and v.shape == p.shape:
                                v.copy_(v.to(dtype))
        state = [{k: v.detach().clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                 for p in params]
        out.append(([p.detach().clone() for p in params], state))
    return out + [None] * (4 - len(out))


@settings(max_examples=PARITY_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@hypothesis.seed(PARITY_SEED)
@given(parity_setups())
def test_parity_with_torch_for_loop(setup):
    # fp32 / fp64: ours equals torch.optim's for-loop at assert_close's
    # default tolerances, params and every state tensor (NaN where torch has
    # NaN). fp16 / bf16: ours is no further from the float64 run than twice
    # torch's own distance, pooled over the params, or than one half-ulp of
    # the largest value per step.
    name, kw, dtype, sizes, grad_scale, steps = setup
    (ours, ours_state), (ref, ref_state), (f64, f64_state), stored = _parity_runs(*setup)
    if dtype in (torch.float32, torch.float64):
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, equal_nan=True)
        for sa, sb in zip(ours_state, ref_state):
            assert sa.keys() == sb.keys()
            for k in sa:
                torch.testing.assert_close(sa[k], sb[k], equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")
        return
    from optim_configs import LOW_PRECISION_RATIO, low_precision_floor

    def err(x, r):
        # (r is finite: a NaN or inf in x is an infinite error)
        return float((x.double() - r).abs().max()) if torch.isfinite(x).all() else float("inf")

    finite = [i for i, r in enumerate(f64) if torch.isfinite(r).all()]  # (f64 diverged: no error)
    if not finite:
        return
    err_ours = max(err(ours[i], f64[i]) for i in finite)
    err_torch = max(err(ref[i], f64[i]) for i in finite)
    reference = torch.cat([f64[i].reshape(-1) for i in finite])
    # Each step rounds each stored value once, ours and torch's alike: over
    # `steps` steps that is up to `steps` half-ulps of the largest value,
    # whoever is closer by chance on a handful of elements.
    floor = max(1, steps / 2) * low_precision_floor(dtype, reference)
    if err_ours <= max(LOW_PRECISION_RATIO * err_torch, floor):
        return
    # Or ours is the storage model's result, to the same floor: the update
    # has switches a stored value can flip, whoever rounded. Lion steps by
    # sign(beta1 * m + (1 - beta1) * g), and a sign flipped by a stored m
    # puts the param 2 * lr from the float64 run (seen: bf16, c = -3e-5 in
    # float64, +6e-5 from m rounded to bf16 the step before); Lars and
    # Lamb switch their trust ratio to 1 on a zero norm (seen: Lars, fp16,
    # trust_clip, a 1-element param: its first step subtracts lr * (|p| /
    # |g|) * g = p, leaving 1e-12 in float64 and exactly 0 once stored;
    # the next step's ratio is then 1 instead of ~1e-11: ours equal to the
    # storage model, 0.05 from the float64 run; torch's fp16 loop happened
    # to keep a -3e-5 residue).
    err_model = max(err(ours[i], stored[0][i].double()) for i in finite)
    assert err_model <= floor, (err_ours, err_torch, err_model, floor)
