"""The ops under the classes: torch.library.opcheck (schema and mutation
annotations, fake/meta kernel, autograd registration, AOT dispatch) and their
values against torch.optim's functional API, with several param groups."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.optim.adagrad import adagrad as adagrad_fn
from torch.optim.adam import adam as adam_fn
from torch.optim.rmsprop import rmsprop as rmsprop_fn
from torch.optim.sgd import sgd as sgd_fn
from torch.testing import assert_close

import fused_optim  # noqa: F401  (registers torch.ops.fused_optim)

SHAPES = [(7,), (4099,), (1,), (3, 5), (0,), (9,)]
GROUP_INDEX = [0, 1, 0, 2, 1, 2]
NGROUPS = 3
STEPS0 = [0.0, 3.0, 1.0, 5.0, 2.0, 0.0]  # step counts before the call


def _rand(shape, seed, dtype, device, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if positive:
        t = t.abs() + 0.1
    return t.to(dtype).to(device)


def _tensors(seed, dtype, device, positive=False):
    return [_rand(s, 1000 * seed + i, dtype, device, positive) for i, s in enumerate(SHAPES)]


# The arguments every op shares, all off (test_mixed_precision.py covers them).
SHARED_NONE = dict(lr_tensors=[], grad_scale=None, found_inf=None, stochastic_rounding=False)


def _steps():
    return [torch.tensor(s, dtype=torch.float32) for s in STEPS0]


def adam_inputs(dtype, device, amsgrad, decoupled, maximize):
    exp_avg_sqs = _tensors(3, dtype, device, positive=True)
    args = (
        _tensors(1, dtype, device),  # params
        _tensors(2, dtype, device),  # grads
        _tensors(4, dtype, device),  # exp_avgs
        exp_avg_sqs,
        [v + _rand(v.shape, 50 + i, dtype, device, positive=True) for i, v in enumerate(exp_avg_sqs)]
        if amsgrad else [],
        [],  # master_params
        _steps(),
        GROUP_INDEX,
        [1e-2, 3e-3, 2e-2],  # lr
        [0.9, 0.8, 0.5],  # beta1
        [0.999, 0.99, 0.9],  # beta2
        [1e-8, 1e-6, 1e-5],  # eps
        [0.0, 0.1, 0.01],  # weight_decay
    )
    return args, dict(amsgrad=amsgrad, decoupled_weight_decay=decoupled, maximize=maximize,
                      **SHARED_NONE)


def sgd_inputs(dtype, device, momentum_on, nesterov, maximize):
    args = (
        _tensors(1, dtype, device),
        _tensors(2, dtype, device),
        _tensors(3, dtype, device) if momentum_on else [],
        [],  # master_params
        [],  # state_steps (SGD keeps none without stochastic rounding)
        GROUP_INDEX,
        [0.1, 0.05, 0.01],  # lr
        [0.9, 0.5, 0.8] if momentum_on else [0.0, 0.0, 0.0],  # momentum
        [0.0, 0.0, 0.0] if nesterov else [0.0, 0.3, 0.1],  # dampening
        [0.0, 0.01, 0.1],  # weight_decay
        [0, 3] if momentum_on else [],  # new_momentum_buffers
    )
    return args, dict(nesterov=nesterov, maximize=maximize, **SHARED_NONE)


def adagrad_inputs(dtype, device, maximize):
    args = (
        _tensors(1, dtype, device),
        _tensors(2, dtype, device),
        _tensors(3, dtype, device, positive=True),  # state_sums
        [],  # master_params
        _steps(),
        GROUP_INDEX,
        [0.1, 0.05, 0.01],  # lr
        [0.0, 0.01, 0.1],  # lr_decay
        [0.0, 0.1, 0.01],  # weight_decay
        [1e-10, 1e-6, 1e-5],  # eps
    )
    return args, dict(maximize=maximize, **SHARED_NONE)


def rmsprop_inputs(dtype, device, centered, momentum_on, maximize):
    square_avgs = _tensors(3, dtype, device, positive=True)
    args = (
        _tensors(1, dtype, device),
        _tensors(2, dtype, device),
        square_avgs,
        # |grad_avg|^2 < square_avg so the centered variance stays positive
        [0.1 * _rand(s.shape, 60 + i, dtype, device) for i, s in enumerate(square_avgs)]
        if centered else [],
        _tensors(4, dtype, device) if momentum_on else [],
        [],  # master_params
        _steps(),
        GROUP_INDEX,
        [1e-2, 3e-3, 2e-2],  # lr
        [0.99, 0.9, 0.8],  # alpha
        [1e-8, 1e-6, 1e-5],  # eps
        [0.0, 0.1, 0.01],  # weight_decay
        [0.9, 0.5, 0.1] if momentum_on else [0.0, 0.0, 0.0],  # momentum
    )
    return args, dict(centered=centered, maximize=maximize, **SHARED_NONE)


B = [False, True]
SAMPLES = {
    "adam_": [(adam_inputs, dict(amsgrad=a, decoupled=d, maximize=m))
              for a, d, m in itertools.product(B, B, B)],
    "sgd_": [(sgd_inputs, dict(momentum_on=mo, nesterov=n, maximize=m))
             for mo, n, m in itertools.product(B, B, B) if mo or not n],
    "adagrad_": [(adagrad_inputs, dict(maximize=m)) for m in B],
    "rmsprop_": [(rmsprop_inputs, dict(centered=c, momentum_on=mo, maximize=m))
                 for c, mo, m in itertools.product(B, B, B)],
}
CASES = [(op, i) for op in SAMPLES for i in range(len(SAMPLES[op]))]


def _case_id(case):
    op, i = case
    _, flags = SAMPLES[op][i]
    return op + "-".join([""] + [k for k, v in flags.items() if v])


def _inputs(op, i, dtype, device):
    fn, flags = SAMPLES[op][i]
    return fn(dtype, device, **flags)


def _op(name):
    return getattr(torch.ops.fused_optim, name).default


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(case, dtype, device):
    op, i = case
    args, kwargs = _inputs(op, i, dtype, device)
    torch.library.opcheck(_op(op), args, kwargs)


def test_schemas():
    shared = "Tensor[] lr_tensors, Tensor? grad_scale, Tensor? found_inf, "
    expected = {
        "adam_": "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
                 "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, "
                 "Tensor(f!)[] master_params, Tensor(g!)[] state_steps, "
                 "int[] group_index, float[] lr, float[] beta1, float[] beta2, float[] eps, "
                 "float[] weight_decay, " + shared + "*, bool amsgrad, "
                 "bool decoupled_weight_decay, bool maximize, bool stochastic_rounding) -> ()",
        "sgd_": "sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, "
                "Tensor(d!)[] master_params, Tensor(e!)[] state_steps, "
                "int[] group_index, float[] lr, float[] momentum, float[] dampening, "
                "float[] weight_decay, int[] new_momentum_buffers, " + shared + "*, "
                "bool nesterov, bool maximize, bool stochastic_rounding) -> ()",
        "adagrad_": "adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
                    "Tensor(d!)[] master_params, Tensor(e!)[] state_steps, int[] group_index, "
                    "float[] lr, float[] lr_decay, float[] weight_decay, float[] eps, "
                    + shared + "*, bool maximize, bool stochastic_rounding) -> ()",
        "rmsprop_": "rmsprop_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
                    "Tensor(d!)[] grad_avgs, Tensor(e!)[] momentum_buffers, "
                    "Tensor(f!)[] master_params, Tensor(g!)[] state_steps, int[] group_index, "
                    "float[] lr, float[] alpha, float[] eps, float[] weight_decay, "
                    "float[] momentum, " + shared + "*, bool centered, bool maximize, "
                    "bool stochastic_rounding) -> ()",
    }
    for name, schema in expected.items():
        got = str(_op(name)._schema)
        assert got == "fused_optim::" + schema, got


# ---------------------------------------------------------------------------
# Values against torch.optim's functional API (per tensor, its group's
# hyperparameters)
# ---------------------------------------------------------------------------


def _clone(args):
    return tuple([t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                 else a for a in args)


def _reference(op, args, kwargs):
    """The same update with torch.optim's single-tensor functional code."""
    args = _clone(args)
    if op == "adam_":
        p, g, m, v, mx, _, st, gi, lr, b1, b2, eps, wd = args
        for i in range(len(p)):
            k = gi[i]
            adam_fn(
                [p[i]], [g[i]], [m[i]], [v[i]], [mx[i]] if kwargs["amsgrad"] else [], [st[i]],
                foreach=False, decoupled_weight_decay=kwargs["decoupled_weight_decay"],
                amsgrad=kwargs["amsgrad"], beta1=b1[k], beta2=b2[k], lr=lr[k],
                weight_decay=wd[k], eps=eps[k], maximize=kwargs["maximize"])
        return p, m, v, mx, st
    if op == "sgd_":
        p, g, bufs, _, _, gi, lr, mom, damp, wd, new = args
        for i in range(len(p)):
            k = gi[i]
            blist = [None if i in new else bufs[i]] if bufs else [None]
            sgd_fn([p[i]], [g[i]], blist, foreach=False, weight_decay=wd[k],
                                momentum=mom[k] if bufs else 0.0, lr=lr[k], dampening=damp[k],
                                nesterov=kwargs["nesterov"], maximize=kwargs["maximize"])
            if bufs and i in new:
                bufs[i] = blist[0]
        return p, bufs
    if op == "adagrad_":
        p, g, sums, _, st, gi, lr, lrd, wd, eps = args
        for i in range(len(p)):
            k = gi[i]
            adagrad_fn([p[i]], [g[i]], [sums[i]], [st[i]], foreach=False,
                                        lr=lr[k], weight_decay=wd[k], lr_decay=lrd[k],
                                        eps=eps[k], maximize=kwargs["maximize"])
        return p, sums, st
    if op == "rmsprop_":
        p, g, sq, ga, mb, _, st, gi, lr, alpha, eps, wd, mom = args
        for i in range(len(p)):
            k = gi[i]
            rmsprop_fn(
                [p[i]], [g[i]], [sq[i]], [ga[i]] if ga else [], [mb[i]] if mb else [], [st[i]],
                foreach=False, maximize=kwargs["maximize"], lr=lr[k], alpha=alpha[k], eps=eps[k],
                weight_decay=wd[k], momentum=mom[k] if mb else 0.0, centered=kwargs["centered"])
        return p, sq, ga, mb, st
    raise ValueError(op)


def _mutated(op, args):
    if op == "adam_":
        return args[0], args[2], args[3], args[4], args[6]
    if op == "sgd_":
        return args[0], args[2]
    if op == "adagrad_":
        return args[0], args[2], args[4]
    return args[0], args[2], args[3], args[4], args[6]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_op_values_match_torch_functional(case, dtype, device):
    op, i = case
    args, kwargs = _inputs(op, i, dtype, device)
    expected = _reference(op, args, kwargs)
    grads_before = [g.clone() for g in args[1]]
    _op(op)(*args, **kwargs)
    for li, (got, exp) in enumerate(zip(_mutated(op, args), expected)):
        assert len(got) == len(exp)
        for ti, (a, b) in enumerate(zip(got, exp)):
            assert_close(a, b, msg=lambda m: f"{op} list {li} tensor {ti}: {m}")
    for g, g0 in zip(args[1], grads_before):
        assert torch.equal(g, g0), "grads are written only to unscale them (grad_scale)"


# ---------------------------------------------------------------------------
# Op argument validation: nothing is written when it raises
# ---------------------------------------------------------------------------

OP_ERRORS = (RuntimeError, ValueError, IndexError)


def _bad_variants(op, args):
    args = list(args)
    gi_pos = {"adam_": 7, "sgd_": 5, "adagrad_": 5, "rmsprop_": 7}[op]
    out = {}
    a = list(args)
    a[1] = a[1][:-1]
    out["grads_shorter"] = a
    a = list(args)
    a[gi_pos] = list(a[gi_pos])
    a[gi_pos][-1] = NGROUPS  # out of range
    out["group_index_out_of_range"] = a
    a = list(args)
    a[gi_pos] = list(a[gi_pos])
    a[gi_pos][-1] = -1
    out["group_index_negative"] = a
    a = list(args)
    a[gi_pos] = list(a[gi_pos])[:-1]
    out["group_index_shorter"] = a
    a = list(args)
    a[gi_pos + 1] = list(a[gi_pos + 1])[:-1]  # lr has fewer entries than groups used
    out["lr_shorter"] = a
    a = list(args)
    a[1] = list(a[1])
    a[1][1] = a[1][1][:-1]  # a grad with fewer elements than its param
    out["grad_numel"] = a
    return out


ERROR_CASES = [(op, variant) for op in SAMPLES for variant in
               ["grads_shorter", "group_index_out_of_range", "group_index_negative",
                "group_index_shorter", "lr_shorter", "grad_numel"]]


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_op_rejects_bad_arguments_before_writing(case, device):
    op, variant = case
    # The sample with every state list present.
    idx = max(range(len(SAMPLES[op])), key=lambda j: sum(bool(v) for v in SAMPLES[op][j][1].values()))
    args, kwargs = _inputs(op, idx, torch.float32, device)
    bad = _bad_variants(op, args)[variant]
    before = [[t.clone() for t in a] for a in _mutated(op, bad)]
    with pytest.raises(OP_ERRORS):
        _op(op)(*bad, **kwargs)
    for a, b in zip(_mutated(op, bad), before):
        for t, t0 in zip(a, b):
            assert torch.equal(t, t0), f"{op} {variant}: a tensor was written before the error"
