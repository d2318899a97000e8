"""Argument validation and atomicity: a constructor, step() or
load_state_dict() that raises leaves every param and every state tensor of
every group bit-identical (each check happens before anything is written)."""

from __future__ import annotations

import copy
import inspect
import re

import pytest
import torch

import fused_optim
from harness import (
    P,
    Run,
    assert_optimizer_unchanged,
    assert_runs_close,
    snapshot_optimizer,
    timm_optimizer,
)
from optim_configs import (
    NOT_IN_TORCH,
    OUR_KEYWORDS,
    ACCEPTED_KWARGS,
    CONSTRUCTOR_ERRORS,
    HAS_FUSED,
    GROUP_OVERRIDES,
    ONE_PER_OPTIMIZER,
    OPTIM_CONFIGS,
    OPTIMIZER_NAMES,
    SPARSE_OK,
    SPARSE_REJECTED,
    SPARSE_STEP_ERROR,
    torch_class,
    STEP_ERROR_EXCEPTIONS,
)

ONE_EACH = pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
ALL = pytest.mark.parametrize("cfg", OPTIM_CONFIGS, ids=str)


def _params():
    return [torch.randn(3, requires_grad=True), torch.randn(2, 2, requires_grad=True)]


# ---------------------------------------------------------------------------
# Constructors
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", CONSTRUCTOR_ERRORS, ids=lambda c: c.id)
def test_constructor_errors(case):
    with pytest.raises(case.exc, match=case.match):
        getattr(fused_optim, case.name)(_params(), **case.kwargs)


@pytest.mark.parametrize("case", [c for c in CONSTRUCTOR_ERRORS if c.from_torch],
                         ids=lambda c: c.id)
def test_error_table_is_torchs(case):
    """The table's messages are torch.optim's own (so ours match torch); for
    an optimizer torch lacks, its reference class's (optim_configs.torch_class)."""
    with pytest.raises(case.exc, match=case.match):
        torch_class(case.name)(_params(), **case.kwargs)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("kwargs", ACCEPTED_KWARGS, ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()))
def test_compat_keywords_accepted(name, kwargs):
    if ("fused" in kwargs and name not in HAS_FUSED) or (name in NOT_IN_TORCH and set(kwargs) != {"foreach"}):
        # like torch: no such keyword (Lion, Lars and Lamb take only timm's
        # foreach: there is no torch implementation to select)
        with pytest.raises(TypeError):
            getattr(fused_optim, name)(_params(), lr=0.01, **kwargs)
        return
    # Accepted, and stepping as torch.optim (or the reference class of an
    # optimizer torch lacks) does with the same keywords.
    torch.manual_seed(0)
    p = _params()
    ref = [t.detach().clone().requires_grad_() for t in p]
    opt = getattr(fused_optim, name)(p, lr=0.01, **kwargs)
    ref_opt = torch_class(name)(ref, lr=0.01, **kwargs)
    assert opt.param_groups[0]["foreach"] == ref_opt.param_groups[0]["foreach"]
    for _ in range(3):
        for t, r in zip(p, ref):
            t.grad = torch.randn_like(t)
            r.grad = t.grad.clone()
        try:
            ref_opt.step()
        except Exception as error:  # e.g. differentiable=True on leaf params
            with pytest.raises(type(error)):
                opt.step()
            return
        opt.step()
    for t, r in zip(p, ref):
        torch.testing.assert_close(t, r)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_tensor_lr_accepted(name):
    p = _params()
    opt = getattr(fused_optim, name)(p, lr=torch.tensor(0.01))
    for t in p:
        t.grad = torch.randn_like(t)
    opt.step()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_signature_matches_torch(name):
    """Same parameter names, order, kinds and defaults as torch 2.13."""
    ts = inspect.signature(torch_class(name).__init__).parameters
    os_ = inspect.signature(getattr(fused_optim, name).__init__).parameters
    # Ours, after the reference's, keyword-only; except those the reference
    # takes itself (timm's Lamb's max_grad_norm), where it has them.
    ours = {n: d for n, d in OUR_KEYWORDS.items() if n not in ts}
    assert list(os_) == list(ts) + list(ours)
    for n, default in ours.items():
        assert os_[n].kind == inspect.Parameter.KEYWORD_ONLY, f"{name}({n}) must be keyword-only"
        assert os_[n].default == default
    for n, tp in ts.items():
        op = os_[n]
        assert op.kind == tp.kind, f"{name}({n}): kind {op.kind} vs torch {tp.kind}"
        assert op.default == tp.default, f"{name}({n}): default {op.default!r} vs torch {tp.default!r}"


@pytest.mark.parametrize("name", ["Lion", "Lars", "Lamb"])
def test_takes_every_keyword_of_timms_class(name):
    """timm's Lion, Lars and Lamb (pinned by scripts/bootstrap.sh) keyword
    by keyword, with timm's defaults, so that timm's optimizer factory and
    train script (which pass ``foreach``, ``caution`` and the rest by
    keyword) can build ours. (Lion's positions are lion-pytorch's.)"""
    theirs = inspect.signature(timm_optimizer(name.lower(), name).__init__).parameters
    ours = inspect.signature(getattr(fused_optim, name).__init__).parameters
    for n, p in theirs.items():
        if n in ("self", "params"):
            continue
        assert n in ours, f"{name}: timm's {n!r} missing"
        assert ours[n].default == p.default, f"{name}({n}): {ours[n].default!r} vs timm's {p.default!r}"


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_is_a_torch_optimizer(name):
    cls = getattr(fused_optim, name)
    assert issubclass(cls, torch.optim.Optimizer)
    assert cls.__name__ == name


def test_cuda_built_is_bool():
    built = fused_optim.cuda_built()
    assert isinstance(built, bool)
    if torch.version.cuda is None:
        assert built is False, "a CPU-only torch cannot have a CUDA build of ours"


# ---------------------------------------------------------------------------
# step(): nothing is written when it raises
# ---------------------------------------------------------------------------


def _bad_param(kind: str, dtype=torch.float32):
    """(param, install): a param, and a function that gives it the grad that
    makes step() raise; `kind` names what is wrong."""
    if kind == "sparse":
        p = torch.randn(10, 3, dtype=dtype, requires_grad=True)
        idx = torch.tensor([[1, 4, 1, 7]])
        g = torch.sparse_coo_tensor(idx, torch.randn(4, 3, dtype=dtype), (10, 3),
                                    check_invariants=True)
        return p, lambda: setattr(p, "grad", g)
    if kind in DTYPE_ERRORS:
        bad_dtype = DTYPE_ERRORS[kind][0]
        p = torch.zeros(4, 3, dtype=bad_dtype)
        return p, lambda: setattr(p, "grad", torch.ones(4, 3, dtype=bad_dtype))
    if kind == "meta_param":
        p = torch.randn(4, 3, dtype=dtype, device="meta", requires_grad=True)
        return p, lambda: setattr(p, "grad", torch.randn(4, 3, dtype=dtype, device="meta"))
    bad = {
        "grad_dtype": lambda: torch.randn(4, 3, dtype=torch.float64),
        "grad_shape": lambda: torch.randn(3, 4, dtype=dtype),  # same numel, other shape
        "grad_numel": lambda: torch.randn(5, 3, dtype=dtype),
    }[kind]
    p = torch.randn(4, 3, dtype=dtype, requires_grad=True)

    def install():
        # The grad setter refuses such grads; `.data` does not (and autograd
        # hooks, DDP or user code can produce them the same way).
        p.grad = torch.randn(4, 3, dtype=dtype)
        p.grad.data = bad()

    return p, install


LAYOUT_ERRORS = ["grad_dtype", "grad_shape", "grad_numel", "meta_param"]

# A group option that makes a group's step the fused one whatever its
# params' devices (Note [params on a device without kernels] in _base.py)
# and changes nothing for float32 params: fused=True, or, for a class
# without that keyword, state_dtype=float32.
_ASKING_FOR_THE_FUSED_STEP = {
    name: {"fused": True} if name in HAS_FUSED else {"state_dtype": torch.float32}
    for name in OPTIMIZER_NAMES}

# Params of a dtype the fused step refuses (torch's code steps a complex32
# one, and fails on an integer one with its own message), with a gradient
# of their own dtype: (dtype, the error).
DTYPE_ERRORS = {
    "int64_param": (torch.int64, "has dtype torch.int64; only floating point and complex params"),
    "complex32_param": (torch.complex32, "is complex32, which is not supported"),
}


class _WithExtra(Run):
    """A Run whose group `extra_group` also holds `extra` (not in .params, so
    set_grads never gives it a grad)."""

    def __init__(self, *args, extra=None, extra_group=1, extra_first=False, **kwargs):
        self._extra = (extra, extra_group, extra_first)
        self.opt_groups_built = 0
        super().__init__(*args, **kwargs)

    def _build_group(self, overrides, specs):
        group = super()._build_group(overrides, specs)
        extra, gi, first = self._extra
        if extra is not None and self.opt_groups_built == gi:
            group["params"] = [extra] + group["params"] if first else group["params"] + [extra]
        self.opt_groups_built += 1
        return group


def _warm_pair(cfg, group2_overrides=None, steps=2, extra=None, extra_group=1, extra_first=False):
    """torch and ours after `steps` steps on two dense groups (state exists);
    ours' group `extra_group` also holds `extra`, which has no grad yet."""
    o1, _ = GROUP_OVERRIDES[cfg.name]
    o1 = {**o1, **(group2_overrides or {})}
    groups = [({}, [P((7,)), P((4099,))]), (o1, [P((9,)), P((3, 5))])]
    ref = Run(cfg.torch_cls, groups, {**cfg.kwargs, "foreach": False})
    ours = _WithExtra(cfg.ours_cls, groups, cfg.kwargs, extra=extra, extra_group=extra_group,
                      extra_first=extra_first)
    for s in range(steps):
        for r in (ref, ours):
            r.set_grads(s)
            r.opt.step()
    return ref, ours


def _check_raises_atomically(cfg, kind, exc, match, *, where, group2_overrides=None, steps=2,
                             extra_group=1, extra_first=False):
    """Group 2 (or `extra_group`) also holds a bad param; after `steps` good
    steps, give every param a grad and the bad one its bad grad, step, expect
    the error and no write. Then drop the bad grad and check that the
    optimizer continues exactly like torch.optim that never had the bad param."""
    bad, install = _bad_param(kind)
    # A meta param joins its group after the warm-up steps: a gradless param
    # on an unsupported device is a separate case
    # (test_gradless_param_on_unsupported_device_is_skipped). Its group asks
    # for the fused step, which has no meta kernels (without asking, the
    # group is stepped by torch.optim's code: test_device_fallback.py).
    late = kind == "meta_param"
    ref, ours = _warm_pair(cfg, group2_overrides, steps, extra=None if late else bad,
                           extra_group=extra_group, extra_first=extra_first)
    if late:
        group = ours.opt.param_groups[extra_group]
        group["params"].insert(0 if extra_first else len(group["params"]), bad)
        group.update(_ASKING_FOR_THE_FUSED_STEP[cfg.name])
    ours.set_grads(steps)
    install()
    snap = snapshot_optimizer(ours.opt)
    with pytest.raises(exc, match=match):
        ours.opt.step()
    assert_optimizer_unchanged(ours.opt, snap, f"{cfg} {where}", allow_new_state=(steps == 0))
    # Recovery: without the bad grad the next step is the step torch takes.
    bad.grad = None
    ours.opt.step()
    ref.set_grads(steps)
    ref.opt.step()
    assert_runs_close(ours, ref, f"{cfg} {where}: step after the failed one")


@pytest.mark.parametrize("cfg", [c for c in OPTIM_CONFIGS if c.name in SPARSE_REJECTED], ids=str)
@pytest.mark.parametrize("steps", [2, 0], ids=["warm", "first_step"])
def test_sparse_grad_rejected_atomically(cfg, steps):
    exc, match = SPARSE_STEP_ERROR
    _check_raises_atomically(cfg, "sparse", exc, match, where="sparse grad in group 2",
                             steps=steps)


def _reference_class(name: str):
    # The class whose message ours starts with: torch.optim's, timm's for
    # its Lamb; timm's Lars and lion-pytorch's Lion have no check (None).
    if hasattr(torch.optim, name):
        return getattr(torch.optim, name)
    return timm_optimizer("lamb", "Lamb") if name == "Lamb" else None


@pytest.mark.parametrize("name", SPARSE_REJECTED)
def test_sparse_grad_error_starts_with_the_reference_message(name):
    """Code that matches torch's message (anchored, or whole up to our
    addition) still matches ours: the reference's text, then where."""
    messages = {}
    for cls in (_reference_class(name), getattr(fused_optim, name)):
        if cls is None:
            continue
        dense = torch.nn.Parameter(torch.randn(3))
        sparse = torch.nn.Parameter(torch.randn(10, 3))
        dense.grad = torch.randn(3)
        sparse.grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.randn(2, 3), (10, 3))
        with pytest.raises(RuntimeError) as raised:
            cls([dense, sparse], lr=0.1).step()
        messages[cls.__module__.startswith("fused_optim")] = str(raised.value)
    reference = messages.get(False, f"{name} does not support sparse gradients")
    assert messages[True] == f"{reference} (fused_optim.{name}: param 1 of param group 0)"


@pytest.mark.parametrize("cfg", [c for c in OPTIM_CONFIGS if c.name in SPARSE_OK], ids=str)
def test_sparse_grad_with_weight_decay_rejected_atomically(cfg):
    # torch: Adagrad "weight_decay option is not compatible with sparse
    # gradients"; SGD "add(sparse, dense) is not supported".
    exc, match = SPARSE_STEP_ERROR
    _check_raises_atomically(cfg, "sparse", exc, match,
                             where="sparse grad with weight_decay in group 2",
                             group2_overrides={"weight_decay": 0.1})


@pytest.mark.parametrize("cfg", [c for c in OPTIM_CONFIGS if c.name in SPARSE_OK], ids=str)
def test_sparse_grad_with_weight_decay_in_a_torch_path_group_rejected_atomically(cfg):
    # Group 2 stepped by torch.optim's own code (fused=False), which raises
    # only after writing (Adagrad: the step counter): ours checks first.
    exc, match = SPARSE_STEP_ERROR
    _check_raises_atomically(cfg, "sparse", exc, match,
                             where="sparse grad with weight_decay in group 2, fused=False",
                             group2_overrides={"weight_decay": 0.1, "fused": False})


@pytest.mark.parametrize("cfg", [c for c in OPTIM_CONFIGS if c.name == "SGD"
                                 and c.kwargs.get("momentum") and not c.kwargs.get("weight_decay")],
                         ids=str)
@pytest.mark.parametrize("fused", [None, False], ids=["fused", "torch_path"])
def test_dense_grad_into_sparse_momentum_rejected_atomically(cfg, fused):
    """SGD keeps the momentum of a first sparse gradient sparse (torch.optim
    too); a dense gradient then cannot be added to it (torch raises
    "add(sparse, dense) is not supported", after updating the params before
    it and scaling the buffer): a clear error, nothing written, the other
    param's step neither; also where torch's code steps the group."""
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    q = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = cfg.ours_cls([q, p], **cfg.kwargs, **({} if fused is None else {"fused": False}))
    p.grad, q.grad = torch.randn(4, 3, dtype=torch.float64).to_sparse(1), torch.randn(5, dtype=torch.float64)
    opt.step()
    assert opt.state[p]["momentum_buffer"].is_sparse
    p.grad, q.grad = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="param 1 of param group 0 has a dense gradient but "
                                           "sparse state"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, f"{cfg} dense grad into sparse momentum")


def test_sparse_grad_into_dense_nesterov_momentum_rejected_atomically():
    """Nesterov momentum with a sparse gradient adds the buffer to it: a
    sparse buffer (made by a first sparse gradient) works, as in torch; a
    dense one (made by a dense gradient) cannot be added, and torch.optim
    raises only after updating that buffer. Ours raises before writing."""
    kw = dict(lr=0.1, momentum=0.9, nesterov=True)
    ps = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)) for _ in range(2)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt, ref_opt = fused_optim.SGD(ps, **kw), torch.optim.SGD(ref, foreach=False, **kw)
    sparse = torch.randn(4, 3, dtype=torch.float64).to_sparse(1)
    dense = torch.randn(4, 3, dtype=torch.float64)
    for params, o in ((ps, opt), (ref, ref_opt)):  # param 0 sparse first, param 1 dense
        params[0].grad, params[1].grad = sparse.clone(), dense.clone()
        o.step()
    for p, q in zip(ps, ref):
        torch.testing.assert_close(p.detach(), q.detach())
    ps[0].grad, ps[1].grad = sparse.clone(), sparse.clone()  # (param 1's buffer is dense)
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="nesterov momentum with a sparse gradient for a param "
                                           "whose momentum buffer is dense"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, "sparse grad into a dense nesterov buffer")
    ref[0].grad, ref[1].grad = sparse.clone(), sparse.clone()
    buffer = ref_opt.state[ref[1]]["momentum_buffer"].clone()
    with pytest.raises(RuntimeError, match="add\\(sparse, dense\\) is not supported"):
        ref_opt.step()
    assert not torch.equal(ref_opt.state[ref[1]]["momentum_buffer"], buffer)  # (torch's write)


def test_sparse_grad_of_other_sparse_dims_than_momentum_rejected_atomically():
    """A sparse momentum buffer (made by a first sparse gradient) takes only
    sparse gradients of its own sparse dims: torch.optim raises for others
    after scaling the buffer; ours raises before writing."""
    p = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    opt = fused_optim.SGD([p], lr=0.1, momentum=0.9)
    g = torch.randn(3, 4, dtype=torch.float64)
    p.grad = g.to_sparse(2)
    opt.step()
    p.grad = g.to_sparse(1)
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="a sparse gradient with 1 sparse dims for a param "
                                           "whose sparse momentum buffer has 2"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, "sparse grad of other sparse dims than the buffer")
    p.grad = g.to_sparse(2)
    opt.step()  # (its own sparse dims: steps)


@ALL
@pytest.mark.parametrize("kind", LAYOUT_ERRORS)
def test_bad_grad_or_param_rejected_atomically(cfg, kind):
    if kind == "meta_param" and cfg.unfused:
        pytest.skip("the plain step runs on meta params, as torch.optim's code does")
    _check_raises_atomically(cfg, kind, STEP_ERROR_EXCEPTIONS, None, where=f"{kind} in group 2")


@ONE_EACH
@pytest.mark.parametrize("kind", LAYOUT_ERRORS)
def test_bad_param_rejected_on_first_step(cfg, kind):
    _check_raises_atomically(cfg, kind, STEP_ERROR_EXCEPTIONS, None,
                             where=f"{kind} in group 2, first step", steps=0)


@ONE_EACH
@pytest.mark.parametrize("kind", ["grad_dtype", "meta_param"])
def test_bad_param_first_in_group_1(cfg, kind):
    """The bad tensor first, in group 1: the rest of group 1 and group 2 must
    not be updated either (no partial progress in any order)."""
    _check_raises_atomically(cfg, kind, STEP_ERROR_EXCEPTIONS, None,
                             where=f"{kind} first in group 1", extra_group=0, extra_first=True)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("cfg", [c for c in ONE_PER_OPTIMIZER if not c.unfused], ids=str)
@pytest.mark.parametrize("steps", [2, 0], ids=["warm", "first_step"])
@pytest.mark.parametrize("kind", sorted(DTYPE_ERRORS))
def test_param_of_a_refused_dtype_rejected_atomically(cfg, kind, steps):
    # (the checks run once per dtype and device in a group: the refused
    # param is the last of its group, after params of another dtype)
    _check_raises_atomically(cfg, kind, ValueError,
                             f"param 2 of param group 1 {re.escape(DTYPE_ERRORS[kind][1])}",
                             where=f"{kind} in group 2", steps=steps)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_fp16_param_in_a_stochastic_rounding_group_rejected_atomically(name):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).bfloat16().requires_grad_() for n in (7, 33)]
    params.append(torch.randn(5, generator=gen).half().requires_grad_())
    opt = getattr(fused_optim, name)(params, lr=0.01, stochastic_rounding=True)
    for step in range(3):  # (the last: the fp16 param's first gradient)
        for p in params[:2] if step < 2 else params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        if step < 2:
            opt.step()
    snap = snapshot_optimizer(opt)
    with pytest.raises(ValueError, match="param 2 of param group 0 is float16: "
                                         "stochastic_rounding is implemented for bfloat16"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, f"{name} fp16 param with stochastic rounding")


@ONE_EACH
def test_gradless_param_on_unsupported_device_is_skipped(cfg):
    """torch.optim skips params without a grad whatever their device; a
    frozen meta-device param in a group must not stop the others' step."""
    meta = torch.randn(4, 3, device="meta", requires_grad=True)
    ref, ours = _warm_pair(cfg, steps=0, extra=meta)
    for s in range(3):
        for r in (ref, ours):
            r.set_grads(s)
            r.opt.step()
        assert_runs_close(ours, ref, f"{cfg} step {s}")


# What asks for the fused step on a meta model (Note [params on a device
# without kernels]): name -> the keywords of each case.
_FUSED_ASKED = {
    **{f"{n}-fused_True": (n, {"fused": True}) for n in HAS_FUSED},
    **{f"{n}-{k}": (n, kw) for n in ("Adam", "RMSprop")
       for k, kw in (("master_weights", {"master_weights": True}),
                     ("state_dtype", {"state_dtype": torch.bfloat16}),
                     ("max_grad_norm", {"max_grad_norm": 1.0}))},
    **{f"{n}-default": (n, {}) for n in NOT_IN_TORCH},
}


@pytest.mark.parametrize("case", sorted(_FUSED_ASKED))
def test_unsupported_device_error_reads_as_torchs(case):
    """Where the fused step is asked for, a step on a device without kernels
    raises torch's own sentence for a fused step there (code written for
    torch.optim matches it: torch's test_fused_error_on_params_on_meta
    does), naming what asked and the way out, and writes nothing."""
    name, kwargs = _FUSED_ASKED[case]
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    opt = getattr(fused_optim, name)(model.parameters(), **kwargs)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError) as raised:
        opt.step()
    message = str(raised.value)
    assert message.startswith(f"fused_optim.{name}: `fused=True` requires all the params to "
                              "be floating point Tensors of supported devices: ['cpu'"), message
    assert "but torch.float32 and meta" in message, message
    assert "fused=True, our precision options or max_grad_norm" in message, message
    assert_optimizer_unchanged(opt, before, f"{case} on meta")


# ---------------------------------------------------------------------------
# load_state_dict(): mismatched layouts raise ValueError and change nothing
# ---------------------------------------------------------------------------


def _mismatches(cfg):
    """(name, state_dict) pairs that must not load into `_warm_pair`'s ours
    (groups of sizes 2 and 2, after 2 steps)."""
    o1, o2 = GROUP_OVERRIDES[cfg.name]
    out = []
    # Other number of groups.
    three = Run(cfg.torch_cls, [({}, [P((7,)), P((4099,))]), (o1, [P((9,))]), (o2, [P((3, 5))])],
                {**cfg.kwargs, "foreach": False})
    out.append(("three_groups", three.opt.state_dict()))
    one = Run(cfg.torch_cls, [({}, [P((7,)), P((4099,)), P((9,)), P((3, 5))])],
              {**cfg.kwargs, "foreach": False})
    out.append(("one_group", one.opt.state_dict()))
    # Same number of params, other group sizes (3 + 1 instead of 2 + 2).
    sizes = Run(cfg.torch_cls, [({}, [P((7,)), P((4099,)), P((9,))]), (o1, [P((3, 5))])],
                {**cfg.kwargs, "foreach": False})
    out.append(("group_sizes", sizes.opt.state_dict()))
    # Right layout, a state tensor of the wrong shape (and a new lr, which
    # must not be applied either).
    ref, _ = _warm_pair(cfg, steps=3)
    for label, idx_to_break, shape_fn in (("state_truncated", 1, lambda t: t[:-1]),
                                          ("state_flattened", 3, lambda t: t.reshape(-1)),
                                          ("state_doubled", 0, lambda t: torch.cat([t, t]))):
        sd = copy.deepcopy(ref.opt.state_dict())
        st = sd["state"][idx_to_break]
        name = next(k for k in sorted(st) if k != "step")
        st[name] = shape_fn(st[name]).clone()
        for g in sd["param_groups"]:
            g["lr"] = 123.0
        out.append((label, sd))
    return dict(out)


MISMATCHES = ["three_groups", "one_group", "group_sizes", "state_truncated", "state_flattened",
              "state_doubled"]


@ONE_EACH
@pytest.mark.parametrize("name", MISMATCHES)
def test_load_state_dict_mismatch(cfg, name):
    sd = _mismatches(cfg)[name]
    ref, ours = _warm_pair(cfg)
    snap = snapshot_optimizer(ours.opt)
    with pytest.raises(ValueError):
        ours.opt.load_state_dict(sd)
    assert_optimizer_unchanged(ours.opt, snap, f"{cfg} load_state_dict({name})")
    # And it still steps like torch.
    for r in (ref, ours):
        r.set_grads(2)
        r.opt.step()
    assert_runs_close(ours, ref, f"{cfg} step after failed load_state_dict({name})")


# how -> (the exception, its message)
BAD_VALUES = {
    # (what DCP's flattened loader makes of a param's missing state)
    "all_keys_empty_dicts": (TypeError, "loaded state dict has state '.*' of type dict"),
    "step_a_string": (TypeError, "loaded state dict has state 'step' of type str"),
    "state_a_list": (TypeError, "loaded state dict has state '.*' of type list"),
    "step_of_two_elements": (ValueError, "state 'step' of 2 elements for a param: expected one"),
    "max_grad_norm_negative": (ValueError, "loaded state dict: Invalid max_grad_norm value: -1"),
}


def _with_bad_values(state_dict, how):
    """A deep copy of ``state_dict`` with a value no step can take (param
    1's state, or group 1's max_grad_norm)."""
    sd = copy.deepcopy(state_dict)
    state = sd["state"][1]
    if how == "all_keys_empty_dicts":
        sd["state"][1] = {name: {} for name in state}
    elif how == "step_a_string":
        state["step"] = "3"
    elif how == "step_of_two_elements":
        state["step"] = state["step"].repeat(2)
    elif how == "max_grad_norm_negative":
        sd["param_groups"][1]["max_grad_norm"] = -1.0
    else:  # a state tensor as a list
        name = next(k for k, v in state.items() if k != "step" and v.dim() > 0)
        state[name] = state[name].tolist()
    return sd


@ONE_EACH
@pytest.mark.parametrize("how", sorted(BAD_VALUES))
@pytest.mark.parametrize("fresh", [False, True], ids=["stepped", "fresh"])
def test_load_state_dict_with_values_no_step_takes(cfg, how, fresh):
    # torch's load raises only after loading (its __setstate__, or a step
    # later), or not at all (a negative max_grad_norm, a step of two
    # elements: the next step refuses them); ours checks first and changes
    # nothing, the first load of a fresh optimizer included.
    ref, ours = _warm_pair(cfg, steps=2)
    if how.startswith("step") and "step" not in ours.opt.state_dict()["state"][1]:
        pytest.skip("no step counter in this optimizer's state")
    sd = _with_bad_values(ours.opt.state_dict(), how)
    target = _warm_pair(cfg, steps=0)[1] if fresh else ours
    snap = snapshot_optimizer(target.opt)
    exception, message = BAD_VALUES[how]
    with pytest.raises(exception, match=message):
        target.opt.load_state_dict(sd)
    assert_optimizer_unchanged(target.opt, snap, f"{cfg} load_state_dict({how})")
    if not fresh:
        for r in (ref, ours):
            r.set_grads(2)
            r.opt.step()
        assert_runs_close(ours, ref, f"{cfg} step after failed load_state_dict({how})")


@pytest.mark.parametrize("name", sorted(HAS_FUSED))
def test_fused_differentiable_group_refused_before_writing(name):
    """A group with differentiable=True under fused=True defaults: torch's
    functional refuses the pair for some classes (Adam, AdamW, Adagrad),
    after it updated the groups before; ours raises the same exception
    before anything is written, and where torch takes it (SGD) steps as
    torch."""
    def build(cls):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 2))
        opt = cls([{"params": [a]}, {"params": [b], "differentiable": True}], lr=0.1, fused=True)
        a.grad, b.grad = torch.ones_like(a), torch.full_like(b, 0.5)
        return opt, (a, b)

    theirs, their_params = build(torch_class(name))
    ours, our_params = build(getattr(fused_optim, name))
    before = snapshot_optimizer(ours)
    try:
        theirs.step()
    except RuntimeError as error:
        with pytest.raises(RuntimeError, match=re.escape(str(error))):
            ours.step()
        assert_optimizer_unchanged(ours, before, f"{name} fused differentiable group")
    else:
        ours.step()
        for mine, its in zip(our_params, their_params):
            torch.testing.assert_close(mine, its)
