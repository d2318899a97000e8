"""Drivers shared by the test modules.

A `Run` owns one optimizer and its parameters. Two runs built from the same
specs and seed have bit-identical parameters (same values AND same memory
layout: views, offsets, strides), and `Run.set_grads(step, ...)` gives both the
same gradient values, so a torch.optim run and a fused_optim run can be
stepped in lockstep and compared after every step. Values are drawn on the
CPU and then moved, so runs on different devices get the same numbers too.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.util
import inspect
import os
import sys
import types
from typing import Any, Callable, Sequence

import pytest

import torch
from torch.testing import assert_close

from optim_configs import (
    LOW_PRECISION_PARAM_SCALE,
    LOW_PRECISION_RATIO,
    OptimConfig,
    low_precision_floor,
)

# ---------------------------------------------------------------------------
# Parameter and gradient construction
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class P:
    """How to build one parameter (and its gradients).

    layout:      "contiguous" | "offset" (view at storage_offset 1 of a bigger
                 buffer: misaligned for every vector width) | "transposed"
                 (2-D, column-major) | "strided" (every 3rd element of a
                 buffer)
    grad_layout: "contiguous" | "transposed" (2-D) | "strided"
    dtype:       overrides the run's dtype for this parameter (mixed buckets)
    """

    shape: tuple[int, ...]
    layout: str = "contiguous"
    grad_layout: str = "contiguous"
    dtype: torch.dtype | None = None


def _values(shape, seed: int, dtype: torch.dtype, quantize: torch.dtype | None, device,
            scale: float = 1.0):
    """Random normal values (never zeros) of `shape`, generated on the CPU in
    a fixed precision so that every dtype and device sees the same numbers,
    rounded through `quantize` when given, then stored as `dtype`."""
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        vals = torch.randn(shape, generator=gen, dtype=torch.complex128)
    else:
        vals = torch.randn(shape, generator=gen, dtype=torch.float64)
        # Keep values away from 0 so that relative checks stay meaningful.
        vals = vals + 0.1 * torch.sign(vals)
    vals = vals * scale
    if quantize is not None:
        vals = vals.to(quantize)
    return vals.to(dtype).to(device)


def _arrange(vals: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to `vals` with the requested memory layout."""
    if layout == "contiguous":
        return vals.clone()
    if layout == "transposed":
        assert vals.dim() == 2, "transposed layout needs a 2-D shape"
        return vals.t().contiguous().t()
    if layout == "strided":
        buf = torch.empty(vals.shape + (3,), dtype=vals.dtype, device=vals.device)
        buf.fill_(7.0)  # never read: only the [..., 1] slice is the tensor
        t = buf[..., 1]
        t.copy_(vals)
        return t
    if layout == "offset":
        n = vals.numel()
        buf = torch.empty(n + 2, dtype=vals.dtype, device=vals.device)
        buf.fill_(-3.0)  # the guard elements before and after the view
        t = buf[1 : n + 1].view(vals.shape)
        t.copy_(vals)
        return t
    raise ValueError(layout)


def make_param(spec: P, seed: int, dtype, device, quantize=None, scale=1.0) -> torch.Tensor:
    dt = spec.dtype or dtype
    q = quantize if spec.dtype is None else None
    p = _arrange(_values(spec.shape, seed, dt, q, device, scale), spec.layout)
    return p.requires_grad_()


# Steps whose gradients are scaled down: second moments then DECREASE, so
# amsgrad's running max differs from exp_avg_sq (with steady gradients they
# stay equal for the first tens of steps and a broken amsgrad would pass).
QUIET_STEPS = {2: 0.05, 6: 0.1}


def make_grad(spec: P, p: torch.Tensor, step: int, index: int, grad_seed: int = 0,
              quantize=None) -> torch.Tensor:
    """Gradient of param `index` at `step`: a fixed per-param direction of
    magnitude >= 0.5 plus per-step noise in [-0.25, 0.25] (scaled down on
    QUIET_STEPS), so that

    - parameters travel (a skipped update shows as an error far larger than
      rounding) while the moments still see fresh values every step;
    - no element is near 0 (never zeros): |g| >= 0.25 (0.0125 on quiet
      steps), so fp16 second moments stay normal numbers in torch's own fp16
      run too.
    """
    q = quantize if spec.dtype is None else None
    g_dir = torch.Generator().manual_seed(20_000_000 + 100_000 * grad_seed + index)
    g_noise = torch.Generator().manual_seed(10_000_000 + 100_000 * grad_seed + 1000 * step + index)
    shape = tuple(p.shape)
    if p.dtype.is_complex:
        shape = shape + (2,)
    d = torch.randn(shape, generator=g_dir, dtype=torch.float64)
    direction = torch.where(d >= 0, 1.0, -1.0) * (0.5 + 0.5 * d.abs())
    noise = 0.25 * (2 * torch.rand(shape, generator=g_noise, dtype=torch.float64) - 1)
    vals = (direction + noise) * QUIET_STEPS.get(step, 1.0)
    if p.dtype.is_complex:
        vals = torch.view_as_complex(vals.contiguous())
    if q is not None:
        vals = vals.to(q)
    return _arrange(vals.to(p.dtype).to(p.device), spec.grad_layout)


def always(step: int, index: int) -> bool:
    return True


def sometimes_none(step: int, index: int) -> bool:
    """Grad schedule with None grads: param 1 gets its first grad at step 3,
    param 2 has none at steps 4 and 7, param 3 never has one."""
    if index == 1:
        return step >= 3
    if index == 2:
        return step not in (4, 7)
    if index == 3:
        return False
    return True


def _clone_tensors(obj):
    """Deep copy with tensors cloned, so two optimizers never share e.g. a
    tensor lr that a scheduler updates in place."""
    return copy.deepcopy(obj)


GroupSpec = tuple[dict[str, Any], Sequence[P]]


class Run:
    """One optimizer over freshly built parameters."""

    def __init__(
        self,
        cls,
        groups: Sequence[GroupSpec],
        kwargs: dict[str, Any],
        *,
        dtype=torch.float32,
        device="cpu",
        seed: int = 0,
        quantize: torch.dtype | None = None,
        grad_seed: int = 0,
        param_scale: float = 1.0,
    ):
        self.dtype, self.device, self.seed, self.quantize = dtype, device, seed, quantize
        self.param_scale = param_scale
        self.grad_seed = grad_seed
        self.params: list[torch.Tensor] = []
        self.specs: list[P] = []
        param_groups = [self._build_group(overrides, specs) for overrides, specs in groups]
        self.opt = cls(param_groups, **_clone_tensors(kwargs))

    def _build_group(self, overrides, specs):
        params = []
        for spec in specs:
            i = len(self.params)
            p = make_param(spec, 1000 * self.seed + i, self.dtype, self.device, self.quantize,
                           self.param_scale)
            self.params.append(p)
            self.specs.append(spec)
            params.append(p)
        return {"params": params, **_clone_tensors(overrides)}

    def add_group(self, overrides, specs):
        self.opt.add_param_group(self._build_group(overrides, specs))

    def set_grads(self, step: int, has_grad: Callable[[int, int], bool] = always):
        for i, (p, spec) in enumerate(zip(self.params, self.specs)):
            if has_grad(step, i):
                p.grad = make_grad(spec, p, step, i, self.grad_seed, self.quantize)
            else:
                p.grad = None

    def copy_params_from(self, other: "Run"):
        with torch.no_grad():
            for p, q in zip(self.params, other.params):
                p.copy_(q)

    def state_of(self, i: int) -> dict:
        return self.opt.state.get(self.params[i], {})


# ---------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------


def _dense(t):
    return t.to_dense() if isinstance(t, torch.Tensor) and t.is_sparse else t


def step_device_of(param: torch.Tensor) -> torch.device:
    """Where ours keeps a param's step counter: on the CPU for CPU params, on
    the param's device otherwise (the CUDA kernels read and advance it there:
    no host sync for AMP's skipped steps, CUDA graphs). torch.optim's unfused,
    non-capturable steps stay on the CPU whatever the param's device."""
    return torch.device("cpu") if param.device.type == "cpu" else param.device


# Per-param 0-d state besides `step` (Note [per-tensor scalar state]): kept
# where the step counter is and checked by value (check_scalar_state).
SCALAR_STATE_KEYS = ("mu_product",)


def check_step_tensor(value, ref, where, device=None):
    """Ours' step counter `value` against torch's `ref`: a 0-d float32 tensor
    of the same value, on `device` (step_device_of(param)) when given. Without
    `device`: on torch's device, or, when torch's is on the CPU, on the CPU or
    an accelerator (ours keeps an accelerator param's step there; the callers
    that know the param pass `device` for the exact check)."""
    assert isinstance(value, torch.Tensor), f"{where}: step is {type(value)}, not a tensor"
    assert value.dtype == torch.float32, f"{where}: step dtype {value.dtype}"
    assert value.dim() == 0, f"{where}: step has shape {tuple(value.shape)}"
    if device is not None:
        expected = torch.device(device)
        assert value.device == expected, (
            f"{where}: step on {value.device}, expected on {expected} (torch's on {ref.device})"
        )
    elif not (ref.device.type == "cpu" and value.device.type != "cpu"):
        assert value.device == ref.device, f"{where}: step on {value.device}, torch's on {ref.device}"
    assert value.item() == ref.item(), f"{where}: step {value.item()} != torch's {ref.item()}"


def check_scalar_state(value, ref, where, device=None):
    """A per-param 0-d scalar state (SCALAR_STATE_KEYS) against torch's: its
    dtype (torch's: float32, or the param's after torch's load casts it,
    which ours follows for float64 params), 0-d, where our step counter is
    (`device`), the same value: exactly on the CPU; on a GPU within rounding
    (derived with the device's pow)."""
    assert isinstance(value, torch.Tensor) and value.dim() == 0, f"{where}: {value!r}"
    assert value.dtype == ref.dtype, f"{where}: dtype {value.dtype} != torch's {ref.dtype}"
    if device is not None:
        assert value.device == torch.device(device), f"{where}: on {value.device}"
    if value.device.type == "cpu":
        assert value.item() == ref.item(), f"{where}: {value.item()} != torch's {ref.item()}"
    else:
        assert_close(value.cpu(), ref.cpu(), msg=lambda m: f"{where}: {m}")


def assert_same_state(ours: dict, ref: dict, where: str, *, close=True, step_device=None):
    """Same state names; `step` identical (on `step_device` when given, see
    check_step_tensor); every other tensor has torch's dtype, shape and
    device and (close=True) values within assert_close."""
    assert set(ours) == set(ref), f"{where}: state keys {sorted(ours)} != torch's {sorted(ref)}"
    for k, r in ref.items():
        v = ours[k]
        w = f"{where} state[{k!r}]"
        if k == "step" or k in SCALAR_STATE_KEYS:
            # (a scalar state is exact on the CPU; on a GPU it is derived
            # with the device's pow: within rounding, csrc/cuda/README.md)
            if k == "step":
                check_step_tensor(v, r, w, step_device)
            else:
                check_scalar_state(v, r, w, step_device)
            continue
        if not isinstance(r, torch.Tensor):  # (torch 1.x's None momentum buffer)
            assert v == r, f"{w}: {v!r} != torch's {r!r}"
            continue
        assert isinstance(v, torch.Tensor), f"{w}: {type(v)}"
        assert v.dtype == r.dtype, f"{w}: dtype {v.dtype} != torch's {r.dtype}"
        assert v.shape == r.shape, f"{w}: shape {tuple(v.shape)} != torch's {tuple(r.shape)}"
        assert v.device == r.device, f"{w}: device {v.device} != torch's {r.device}"
        if close:
            assert_close(_dense(v), _dense(r), msg=lambda m: f"{w}: {m}")


def assert_states_equal(ours, ours_params, theirs, theirs_params, keys, where: str):
    """The state tensors ``keys`` of each pair of params of two optimizers
    are equal bit for bit (the message counts the elements that differ)."""
    for i, (p, q) in enumerate(zip(ours_params, theirs_params)):
        for key in keys:
            mine, other = ours.state[p][key], theirs.state[q][key]
            assert torch.equal(mine, other), (
                f"{where} param {i} {key}: {int((mine != other).sum())} of "
                f"{mine.numel()} elements differ")


def assert_runs_close(ours: Run, ref: Run, where: str):
    for i, (po, pr) in enumerate(zip(ours.params, ref.params)):
        w = f"{where} param {i} {ours.specs[i]}"
        assert po.dtype == pr.dtype and po.shape == pr.shape
        assert_close(po.detach(), pr.detach(), msg=lambda m: f"{w}: {m}")
        if pr._base is not None:
            # The whole buffer: catches writes outside the view.
            assert_close(po._base, pr._base, msg=lambda m: f"{w} (whole base buffer): {m}")
        assert_same_state(ours.state_of(i), ref.state_of(i), w, step_device=step_device_of(po))


def snapshot_params(run: Run):
    return [p.detach().clone() for p in run.params]


def assert_moved(run: Run, initial, where="", indices=None):
    """The test itself is meaningful: parameters that received updates
    changed (a no-op optimizer must fail the parity tests)."""
    indices = range(len(run.params)) if indices is None else indices
    for i in indices:
        p, p0 = run.params[i], initial[i]
        if p.numel() and torch.equal(p.detach(), p0):
            raise AssertionError(f"{where}: param {i} {run.specs[i]} did not move")


def run_parity(
    cfg: OptimConfig,
    groups: Sequence[GroupSpec],
    steps: int,
    *,
    dtype=torch.float32,
    device="cpu",
    has_grad=always,
    before_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    kwargs: dict[str, Any] | None = None,
):
    """Step torch.optim (foreach=False) and ours in lockstep on identical
    inputs; compare params and every state tensor after each step."""
    kw = dict(cfg.kwargs if kwargs is None else kwargs)
    ref = Run(cfg.torch_cls, groups, {**kw, "foreach": False}, dtype=dtype, device=device)
    ours = Run(cfg.ours_cls, groups, kw, dtype=dtype, device=device)
    assert_runs_close(ours, ref, f"{cfg} after construction")
    initial = snapshot_params(ours)
    scheds = [scheduler(r.opt) for r in (ref, ours)] if scheduler else None
    for s in range(steps):
        for r in (ref, ours):
            r.set_grads(s, has_grad)
            if before_step is not None:
                before_step(s, r.opt)
        ref.opt.step()
        ours.opt.step()
        if scheds:
            for sch in scheds:
                sch.step()
        assert_runs_close(ours, ref, f"{cfg} {dtype} step {s}")
    ever = [i for i in range(len(ours.params)) if any(has_grad(s, i) for s in range(steps))]
    assert_moved(ours, initial, str(cfg), ever)
    return ref, ours


# ---------------------------------------------------------------------------
# Low precision: the 2x-of-torch error rule
# ---------------------------------------------------------------------------


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    if x.numel() == 0:
        return 0.0
    return (_dense(x).detach().to(torch.float64) - _dense(ref).detach()).abs().max().item()


def _pooled_named_tensors(run: Run):
    """{kind: [tensor per param]}, kind = "param" or a state name."""
    out: dict[str, list] = {"param": list(run.params)}
    for i in range(len(run.params)):
        for k, v in run.state_of(i).items():
            if k != "step":
                out.setdefault(k, []).append((i, v))
    return out


def run_low_precision(
    cfg: OptimConfig,
    groups: Sequence[GroupSpec],
    steps: int,
    dtype: torch.dtype,
    *,
    device="cpu",
    has_grad=always,
):
    """ours(dtype) and torch.optim(dtype) against torch.optim(float64), all
    three from the same (dtype-representable) starting values and gradients.

    After every step, for the params and for each state name, pooled over all
    tensors of the run: max|ours - f64| <= max(RATIO * max|torch - f64|, floor).
    """
    kw = dict(cfg.kwargs)
    common = dict(device=device, quantize=dtype, param_scale=LOW_PRECISION_PARAM_SCALE)
    tref = Run(cfg.torch_cls, groups, {**kw, "foreach": False}, dtype=dtype, **common)
    ours = Run(cfg.ours_cls, groups, kw, dtype=dtype, **common)
    f64 = Run(cfg.torch_cls, groups, {**kw, "foreach": False}, dtype=torch.float64, **common)
    initial = [p.detach().clone() for p in f64.params]
    for s in range(steps):
        for r in (tref, ours, f64):
            r.set_grads(s, has_grad)
            r.opt.step()
        for i in range(len(ours.params)):
            assert_same_state(ours.state_of(i), tref.state_of(i), f"{cfg} {dtype} step {s} param {i}",
                              close=False, step_device=step_device_of(ours.params[i]))
        ref_kinds = _pooled_named_tensors(f64)
        t_kinds = _pooled_named_tensors(tref)
        o_kinds = _pooled_named_tensors(ours)
        assert set(o_kinds) == set(ref_kinds)
        for kind in ref_kinds:
            if kind == "param":
                triples = [(o, t, r) for o, t, r in zip(o_kinds[kind], t_kinds[kind], ref_kinds[kind])]
            else:
                tmap, omap = dict(t_kinds[kind]), dict(o_kinds[kind])
                triples = [(omap[i], tmap[i], r) for i, r in ref_kinds[kind]]
            err_t = max((_max_err(t, r) for _, t, r in triples), default=0.0)
            err_o = max((_max_err(o, r) for o, _, r in triples), default=0.0)
            floor = max((low_precision_floor(dtype, _dense(r)) for _, _, r in triples), default=0.0)
            bound = max(LOW_PRECISION_RATIO * err_t, floor)
            assert err_o <= bound, (
                f"{cfg} {dtype} step {s} {kind}: ours' max error vs float64 {err_o:.3e} > "
                f"bound {bound:.3e} (torch.optim's own {dtype} error {err_t:.3e}, floor {floor:.3e})"
            )
            if kind == "param":
                param_bound = bound
    # The rule is meaningful only if it fails a skipped update (e.g. a whole
    # SIMD block left unwritten), whose error is the float64 run's movement:
    # a parameter moved by more than the pooled bound is covered. One moved
    # by less (a small tensor beside large ones, whose float16 rounding sets
    # the bound: LAMB's) is checked on its own: ours must have moved it, to
    # within half its movement. (Tensor by tensor is not the rule itself: a
    # tensor that torch happens to round like float64 would demand the same
    # luck of ours.)
    for i, p0 in enumerate(initial):
        if p0.numel() == 0 or not any(has_grad(s, i) for s in range(steps)):
            continue
        movement = (f64.params[i].detach() - p0).abs().median().item()
        if movement > param_bound:
            continue
        err = _max_err(ours.params[i], f64.params[i])
        assert err < movement / 2, (
            f"{cfg} {dtype} param {i}: ours' error vs float64 {err:.3e} is not below half "
            f"the float64 run's median movement {movement:.3e} (under the pooled bound "
            f"{param_bound:.3e}): an update skipped or lost"
        )
    return tref, ours, f64


# ---------------------------------------------------------------------------
# Bit-exact snapshots (atomicity tests)
# ---------------------------------------------------------------------------


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor whose equality means bit-identity of `t` (NaN-safe, -0.0)."""
    t = _dense(t).detach()
    if t.device.type == "meta":
        return t
    t = t.cpu().clone()
    if t.is_complex():
        t = torch.view_as_real(t)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()]) if t.dtype.is_floating_point else t


def snapshot_optimizer(opt: torch.optim.Optimizer):
    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, p in enumerate(params):
        st = opt.state.get(p)
        if st:
            state[i] = {k: (bits(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v))
                        for k, v in st.items()}
    groups = [{k: (bits(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v))
               for k, v in g.items() if k != "params"} for g in opt.param_groups]
    sizes = [len(g["params"]) for g in opt.param_groups]
    return dict(params=[bits(p) for p in params], state=state, groups=groups, sizes=sizes,
                param_ids=[id(p) for p in params])


def _eq(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.device.type == "meta" or b.device.type == "meta":
            return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return a == b


def assert_optimizer_unchanged(opt, snap, where, *, allow_new_state=False):
    now = snapshot_optimizer(opt)
    assert now["sizes"] == snap["sizes"], f"{where}: group sizes changed"
    assert now["param_ids"] == snap["param_ids"], f"{where}: param objects changed"
    for i, (a, b) in enumerate(zip(now["params"], snap["params"])):
        assert _eq(a, b), f"{where}: param {i} was written"
    for gi, (a, b) in enumerate(zip(now["groups"], snap["groups"])):
        assert set(a) == set(b), f"{where}: group {gi} keys changed"
        for k in b:
            assert _eq(a[k], b[k]), f"{where}: group {gi} {k!r} changed: {b[k]} -> {a[k]}"
    for i, st in snap["state"].items():
        assert i in now["state"], f"{where}: state of param {i} removed"
        # (in order: state_dict() and checkpoints list them so)
        assert list(now["state"][i]) == list(st), f"{where}: state keys of param {i} changed"
        for k in st:
            assert _eq(now["state"][i][k], st[k]), f"{where}: state[{k!r}] of param {i} was written"
    if not allow_new_state:
        assert set(now["state"]) == set(snap["state"]), (
            f"{where}: state created for params {sorted(set(now['state']) - set(snap['state']))}"
        )


# ---------------------------------------------------------------------------
# Trust-ratio optimizers (tests/test_lars.py, tests/test_lamb.py)
# ---------------------------------------------------------------------------


def trust_ratio_params(dtype, num_groups, sizes, scales=None, seed=0) -> list:
    """``num_groups`` groups of params of ``sizes``, N(0, 1) in float64
    (times the group's entry of ``scales``) cast to ``dtype``; the last of
    each group all zeros, so that its norm is 0 (a trust ratio of 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(num_groups):
        for i, n in enumerate(sizes):
            t = torch.randn(n, generator=g, dtype=torch.float64) * (1.0 if scales is None else scales[k])
            if i == len(sizes) - 1:
                t.zero_()
            out.append(torch.nn.Parameter(t.to(dtype)))
    return out


def seeded_grads(step, dtype, params) -> list:
    """Step ``step``'s gradients of ``params``: N(0, 1) in float64, cast."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype) for p in params]


# ---------------------------------------------------------------------------
# AMP: an optimizer whose step unscales (GradScaler hands it its scale)
# ---------------------------------------------------------------------------


def unscaling_in_step(cls, kwargs, in_step: bool = True):
    """(cls, kwargs) of an optimizer whose step unscales under GradScaler
    (Note [who unscales under GradScaler]): fused=True where the class takes
    it; for the others, ours with the flag set by hand, to reach for float32
    params the kernels' unscaling that master_weights=True reaches. With
    in_step=False, (cls, kwargs) as given: GradScaler unscales."""
    if not in_step:
        return cls, kwargs
    if "fused" in inspect.signature(cls.__init__).parameters:
        return cls, {**kwargs, "fused": True}

    def build(params, **kw):
        opt = cls(params, **kw)
        opt._step_supports_amp_scaling = True
        return opt

    build.__name__ = cls.__name__
    return build, kwargs


@functools.lru_cache(maxsize=None)
def _timm_optim_module(name: str):
    # Only timm/optim/<name>.py and the files it imports relatively
    # (_helpers.py, _types.py: torch only), loaded as a stand-in package:
    # timm's own package imports torchvision, which we do not install.
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "optim")
    package = types.ModuleType("_timm_optim")
    package.__path__ = [folder]
    sys.modules.setdefault("_timm_optim", package)
    module_spec = importlib.util.spec_from_file_location(f"_timm_optim.{name}",
                                                         os.path.join(folder, f"{name}.py"))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[f"_timm_optim.{name}"] = module
    module_spec.loader.exec_module(module)
    return module


def timm_optimizer(name: str, cls: str):
    """timm's optimizer class ``cls`` from timm/optim/<name>.py (timm as
    scripts/bootstrap.sh pins it, installed without dependencies), or a
    pytest skip where timm is not installed."""
    module = _timm_optim_module(name)
    if module is None:
        pytest.skip("timm is not installed")
    return getattr(module, cls)


def torch_clip_(opt, max_norms) -> torch.Tensor:
    """torch's per-group clipping: the total norm over every gradient of
    ``opt`` (all groups), then each group with a max_norm (None: not
    clipped) scaled by torch's clip_grad_norm_ factor. Returns torch's
    norm (``get_total_norm``, in the gradients' dtype).

    The factor is computed from torch's norm of the gradients in float64,
    rounded to the gradients' dtype: ours accumulates in float64 too, and
    torch's float32 norm is a few ulps off it. With a factor a few ulps off,
    a clipped gradient that nearly cancels weight decay (0.05 * p against a
    gradient clipped to ~0.005) moves RMSprop's and Adagrad's denominators
    by far more than the comparison's rtol: the trajectories then compare
    the kernels, not two roundings of the norm (which is compared itself)."""
    grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=False)
    exact = torch.nn.utils.get_total_norm([g.to(torch.complex128 if g.is_complex() else torch.float64)
                                           for g in grads], 2.0, foreach=False).to(norm.dtype)
    for group, max_norm in zip(opt.param_groups, max_norms):
        if max_norm is None:
            continue
        coef = torch.clamp(max_norm / (exact + 1e-6), max=1.0)
        for p in group["params"]:
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.device))
    return norm
