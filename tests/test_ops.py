"""The ops under the classes, in both overloads (``float[] lr`` and
``.tensor_lr``, one lr tensor per group): torch.library.opcheck (schema and
mutation annotations, fake/meta kernel, autograd registration, AOT
dispatch), their exact schemas, their values against torch.optim's
functional API with several param groups (whose per-group flags, maximize
and Adam's decoupled_weight_decay, differ within one call), and their
argument checks, which raise before anything is written.

What the tests need of each op is its `OpTable` in `OPS`: how to build
its call, the samples it is tried with, and its per-tensor reference. The
calls are built by argument name (``_ops.SIGNATURES[op].arguments``), as
the optimizer classes build them."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import pytest
import torch
from torch.optim.adagrad import adagrad as adagrad_fn
from torch.optim.adam import adam as adam_fn
from torch.optim.nadam import nadam as nadam_fn
from torch.optim.radam import radam as radam_fn
from torch.optim.rmsprop import rmsprop as rmsprop_fn
from torch.optim.sgd import sgd as sgd_fn
from torch.testing import assert_close

from fused_optim import _C, _ops  # (importing fused_optim registers torch.ops.fused_optim)
from fused_optim import _reference as reference_rules

SHAPES = [(7,), (4099,), (1,), (3, 5), (0,), (9,)]
GROUP_INDEX = [0, 1, 0, 2, 1, 2]
NGROUPS = 3
STEPS0 = [0.0, 3.0, 1.0, 5.0, 2.0, 0.0]  # step counts before the call

# Per-group flag lists (maximize, decoupled_weight_decay): off, on, or
# differing between the groups of one call. The mixed patterns differ
# between groups 1 and 2, the groups with weight decay.
PATTERNS = {
    "none": [False, False, False],
    "all": [True, True, True],
    "mixed": [True, False, True],
}
DECOUPLED_PATTERNS = {**PATTERNS, "mixed": [False, True, False]}


def _rand(shape, seed, dtype, device, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    if positive:
        t = t.abs() + 0.1
    return t.to(dtype).to(device)


def _tensors(seed, dtype, device, positive=False):
    return [_rand(s, 1000 * seed + i, dtype, device, positive) for i, s in enumerate(SHAPES)]


def _scalars(device, values=STEPS0):
    """Per-tensor 0-d float32 scalars (step counters, mu_products) where the
    op keeps them: with the params (on the CPU for CPU params, on the
    params' GPU for CUDA ones)."""
    return [torch.tensor(s, dtype=torch.float32, device=device) for s in values]


def _named(*, params, grads, states, steps, lr, hyper, flags, modes, new_state=None,
           scalar_states=None):
    """A call's arguments by name (``OpSignature.arguments``' keywords);
    the arguments every op shares are off (test_mixed_precision.py and
    test_amp.py cover them)."""
    return dict(params=params, grads=grads, states=states, master_params=[], steps=steps,
                group_index=list(GROUP_INDEX), lr=lr, hyper=hyper, group_flags=flags,
                new_state=new_state, grad_scale=None, found_inf=None, modes=modes,
                stochastic_rounding=False, scalar_states=scalar_states or {})


# ---------------------------------------------------------------------------
# One table per op: how to build its call, the samples it is tried with, and
# its reference (torch.optim's single-tensor functional code, or the
# reference rule of fused_optim._reference where torch.optim has none)
# ---------------------------------------------------------------------------


class _OneTensor:
    """Tensor ``i`` of a call given by name, with its group's lr,
    hyperparameters and flags, by schema name (which are the keywords of
    torch's functional code): what a reference updates in place."""

    def __init__(self, named, i):
        k = named["group_index"][i]
        self._lists = {**named["states"], **named["scalar_states"]}
        self._i = i
        self.param, self.grad = named["params"][i], named["grads"][i]
        self.step = named["steps"][i] if named["steps"] else None
        self.lr = float(named["lr"][k])  # (an lr tensor's value, rounded as the op reads it)
        self.hyper = {name: values[k] for name, values in named["hyper"].items()}
        self.flags = {name: values[k] for name, values in named["group_flags"].items()}
        self.modes = named["modes"]
        # a state tensor the op creates: its given tensor holds nothing yet
        self.is_new = i in (named["new_state"] or ())

    def state(self, name):
        """This tensor's entry of state list ``name``; None if the call has no such list."""
        return self._lists[name][self._i] if name in self._lists else None

    def states(self, name):
        """As ``state``, as a list of at most one tensor (torch's functional code's argument)."""
        return [self._lists[name][self._i]] if name in self._lists else []

    def set_state(self, name, tensor):
        self._lists[name][self._i] = tensor


def _grid(where=lambda sample: True, **axes):
    """Every combination of the axes' values (the last axis varies
    fastest), as keyword dicts, those ``where`` accepts."""
    samples = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    return [sample for sample in samples if where(sample)]


@dataclasses.dataclass(frozen=True)
class OpTable:
    """What the tests of this file need of one op."""

    inputs: Callable[..., dict]  # inputs(dtype, device, **sample): the call by name
    samples: list  # the keyword dicts `inputs` is tried with
    full: dict  # the sample with every state list and per-group flags that differ
    reference: Callable[[_OneTensor], None]  # one tensor's update, in place


B = [False, True]
P = list(PATTERNS)
_NESTEROV_NEEDS_MOMENTUM = dict(where=lambda s: s["momentum_on"] or not s["nesterov"])


def adam_inputs(dtype, device, amsgrad, maximize, decoupled):
    exp_avg_sqs = _tensors(3, dtype, device, positive=True)
    states = {"exp_avgs": _tensors(4, dtype, device), "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sqs"] = [
            v + _rand(v.shape, 50 + i, dtype, device, positive=True) for i, v in enumerate(exp_avg_sqs)]
    return _named(
        params=_tensors(1, dtype, device), grads=_tensors(2, dtype, device), states=states,
        steps=_scalars(device), lr=[1e-2, 3e-3, 2e-2],
        hyper={"beta1": [0.9, 0.8, 0.5], "beta2": [0.999, 0.99, 0.9],
               "eps": [1e-8, 1e-6, 1e-5], "weight_decay": [0.0, 0.1, 0.01]},
        flags={"maximize": PATTERNS[maximize], "decoupled_weight_decay": DECOUPLED_PATTERNS[decoupled]},
        modes={"amsgrad": amsgrad})


def adam_reference(t):
    adam_fn([t.param], [t.grad], t.states("exp_avgs"), t.states("exp_avg_sqs"),
            t.states("max_exp_avg_sqs"), [t.step], foreach=False, amsgrad=t.modes["amsgrad"],
            lr=t.lr, **t.hyper, **t.flags)


def sgd_inputs(dtype, device, momentum_on, nesterov, maximize):
    return _named(
        params=_tensors(1, dtype, device), grads=_tensors(2, dtype, device),
        states={"momentum_buffers": _tensors(3, dtype, device)} if momentum_on else {},
        steps=[],  # SGD keeps no step counters without stochastic rounding
        lr=[0.1, 0.05, 0.01],
        hyper={"momentum": [0.9, 0.5, 0.8] if momentum_on else [0.0, 0.0, 0.0],
               "dampening": [0.0, 0.0, 0.0] if nesterov else [0.0, 0.3, 0.1],
               "weight_decay": [0.0, 0.01, 0.1]},
        flags={"maximize": PATTERNS[maximize]},
        new_state=[0, 3] if momentum_on else [],  # tensors whose buffer is new
        modes={"nesterov": nesterov})


def sgd_reference(t):
    buffers = [None if t.is_new else t.state("momentum_buffers")]  # (torch makes a new one)
    sgd_fn([t.param], [t.grad], buffers, foreach=False, lr=t.lr, nesterov=t.modes["nesterov"],
           **t.hyper, **t.flags)
    if t.is_new:
        t.set_state("momentum_buffers", buffers[0])


def adagrad_inputs(dtype, device, maximize):
    return _named(
        params=_tensors(1, dtype, device), grads=_tensors(2, dtype, device),
        states={"sums": _tensors(3, dtype, device, positive=True)},
        steps=_scalars(device), lr=[0.1, 0.05, 0.01],
        hyper={"lr_decay": [0.0, 0.01, 0.1], "weight_decay": [0.0, 0.1, 0.01],
               "eps": [1e-10, 1e-6, 1e-5]},
        flags={"maximize": PATTERNS[maximize]},
        modes={})


def adagrad_reference(t):
    adagrad_fn([t.param], [t.grad], t.states("sums"), [t.step], foreach=False, lr=t.lr,
               **t.hyper, **t.flags)


def rmsprop_inputs(dtype, device, centered, momentum_on, maximize):
    square_avgs = _tensors(3, dtype, device, positive=True)
    states = {"square_avgs": square_avgs}
    if centered:
        # |grad_avg|^2 < square_avg so the centered variance stays positive
        states["grad_avgs"] = [0.1 * _rand(s.shape, 60 + i, dtype, device)
                               for i, s in enumerate(square_avgs)]
    if momentum_on:
        states["momentum_buffers"] = _tensors(4, dtype, device)
    return _named(
        params=_tensors(1, dtype, device), grads=_tensors(2, dtype, device), states=states,
        steps=_scalars(device), lr=[1e-2, 3e-3, 2e-2],
        hyper={"alpha": [0.99, 0.9, 0.8], "eps": [1e-8, 1e-6, 1e-5],
               "weight_decay": [0.0, 0.1, 0.01],
               "momentum": [0.9, 0.5, 0.1] if momentum_on else [0.0, 0.0, 0.0]},
        flags={"maximize": PATTERNS[maximize]},
        modes={"centered": centered})


def rmsprop_reference(t):
    rmsprop_fn([t.param], [t.grad], t.states("square_avgs"), t.states("grad_avgs"),
               t.states("momentum_buffers"), [t.step], foreach=False, lr=t.lr,
               centered=t.modes["centered"], **t.hyper, **t.flags)


def radam_inputs(dtype, device, maximize, decoupled):
    # Steps after the call: 1, 10, 2, 31, 3, 1: both sides of RAdam's
    # rectification threshold (rho_t > 5 from step 6 on).
    return _named(
        params=_tensors(1, dtype, device), grads=_tensors(2, dtype, device),
        states={"exp_avgs": _tensors(4, dtype, device),
                "exp_avg_sqs": _tensors(3, dtype, device, positive=True)},
        steps=_scalars(device, (0.0, 9.0, 1.0, 30.0, 2.0, 0.0)),
        lr=[1e-2, 3e-3, 2e-2],
        hyper={"beta1": [0.9, 0.8, 0.5], "beta2": [0.999, 0.99, 0.9],
               "eps": [1e-8, 1e-6, 1e-5], "weight_decay": [0.0, 0.1, 0.01]},
        flags={"maximize": PATTERNS[maximize], "decoupled_weight_decay": DECOUPLED_PATTERNS[decoupled]},
        modes={})


def radam_reference(t):
    radam_fn([t.param], [t.grad], t.states("exp_avgs"), t.states("exp_avg_sqs"), [t.step],
             foreach=False, lr=t.lr, **t.hyper, **t.flags)


def nadam_inputs(dtype, device, maximize, decoupled):
    # mu_products: 0-d float32 per tensor (one float64), as a run would have
    # them after the steps before the call.
    mu = _scalars(device, (1.0, 0.4, 0.9, 0.2, 0.6, 1.0))
    mu[3] = mu[3].double()
    return _named(
        params=_tensors(1, dtype, device), grads=_tensors(2, dtype, device),
        states={"exp_avgs": _tensors(4, dtype, device),
                "exp_avg_sqs": _tensors(3, dtype, device, positive=True)},
        steps=_scalars(device), lr=[1e-2, 3e-3, 2e-2],
        hyper={"beta1": [0.9, 0.8, 0.5], "beta2": [0.999, 0.99, 0.9],
               "eps": [1e-8, 1e-6, 1e-5], "weight_decay": [0.0, 0.1, 0.01],
               "momentum_decay": [4e-3, 0.01, 0.0]},
        flags={"maximize": PATTERNS[maximize], "decoupled_weight_decay": DECOUPLED_PATTERNS[decoupled]},
        modes={}, scalar_states={"mu_products": mu})


def nadam_reference(t):
    nadam_fn([t.param], [t.grad], t.states("exp_avgs"), t.states("exp_avg_sqs"),
             t.states("mu_products"), [t.step], foreach=False, lr=t.lr, **t.hyper, **t.flags)


def lion_inputs(dtype, device, maximize):
    return _named(
        params=_tensors(1, dtype, device), grads=_tensors(2, dtype, device),
        states={"exp_avgs": _tensors(4, dtype, device)},
        steps=[],  # Lion keeps no step counters without stochastic rounding
        lr=[1e-2, 3e-3, 2e-2],
        hyper={"beta1": [0.9, 0.8, 0.5], "beta2": [0.99, 0.9, 0.999],
               "weight_decay": [0.0, 0.1, 0.5],
               "max_lr": [0.0, 0.0, 4e-2]},  # (group 2: timm's corrected decay)
        flags={"maximize": PATTERNS[maximize]},
        modes={})


def lion_reference(t):
    h = t.hyper
    reference_rules.lion(t.param, t.grad, {"exp_avg": t.state("exp_avgs")}, lr=t.lr,
                         betas=(h["beta1"], h["beta2"]), weight_decay=h["weight_decay"],
                         max_lr=h["max_lr"] or None, **t.flags)


def lars_inputs(dtype, device, momentum_on, nesterov, maximize):
    # group 0: not adapted (weight_decay 0); group 1: adapted with decay and
    # LARC clipping; group 2: always_adapt without decay. Tensor 4 (shape
    # (0,)) has zero norms: ratio 1.
    return _named(
        params=_tensors(1, dtype, device), grads=_tensors(2, dtype, device),
        states={"momentum_buffers": _tensors(3, dtype, device)} if momentum_on else {},
        steps=[],  # LARS keeps no step counters without stochastic rounding
        lr=[0.1, 0.05, 1.0],
        hyper={"momentum": [0.9, 0.5, 0.8] if momentum_on else [0.0, 0.0, 0.0],
               "dampening": [0.0, 0.0, 0.0] if nesterov else [0.0, 0.3, 0.1],
               "weight_decay": [0.0, 0.01, 0.0],
               "trust_coeff": [0.001, 0.02, 0.01],
               "eps": [1e-8, 1e-6, 1e-8],
               "trust_clip": [0.0, 1.0, 0.0],
               "always_adapt": [0.0, 0.0, 1.0]},
        flags={"maximize": PATTERNS[maximize]},
        new_state=[0, 3] if momentum_on else [],  # tensors whose buffer is new
        modes={"nesterov": nesterov})


def lars_reference(t):
    buffer = t.state("momentum_buffers")
    state = {} if t.is_new or buffer is None else {"momentum_buffer": buffer}
    # (the op's 0/1 hyperparameters are the rule's bools)
    hyper = {**t.hyper, "trust_clip": bool(t.hyper["trust_clip"]),
             "always_adapt": bool(t.hyper["always_adapt"])}
    reference_rules.lars(t.param, t.grad, state, lr=t.lr, nesterov=t.modes["nesterov"],
                         **hyper, **t.flags)
    if t.is_new:
        t.set_state("momentum_buffers", state["momentum_buffer"])


def lamb_inputs(dtype, device, maximize, decoupled):
    # group 0: not adapted (weight_decay 0), no bias correction; group 1:
    # adapted with decay, without grad averaging; group 2: always_adapt
    # without decay, LAMBC clipping. (Clipping in group 1 would hide its
    # decoupled flag: at a ratio of 1 both decays are the same step.) Group
    # 1's decay, when decoupled, is timm's corrected one (max_lr > 0).
    # Tensor 4 (shape (0,)) has zero norms: ratio 1.
    return _named(
        params=_tensors(1, dtype, device), grads=_tensors(2, dtype, device),
        states={"exp_avgs": _tensors(4, dtype, device),
                "exp_avg_sqs": _tensors(3, dtype, device, positive=True)},
        steps=_scalars(device), lr=[1e-2, 3e-3, 2e-2],
        hyper={"beta1": [0.9, 0.8, 0.5], "beta2": [0.999, 0.99, 0.9],
               "eps": [1e-6, 1e-8, 1e-5], "weight_decay": [0.0, 0.1, 0.0],
               "bias_correction": [0.0, 1.0, 1.0],
               "grad_averaging": [1.0, 0.0, 1.0],
               "trust_clip": [0.0, 0.0, 1.0],
               "always_adapt": [0.0, 0.0, 1.0],
               "max_lr": [0.0, 6e-3, 0.0]},
        flags={"maximize": PATTERNS[maximize], "decoupled_weight_decay": DECOUPLED_PATTERNS[decoupled]},
        modes={})


def lamb_reference(t):
    # (the rule counts the step in the state's tensor, as the op does)
    h = t.hyper
    state = {"step": t.step, "exp_avg": t.state("exp_avgs"), "exp_avg_sq": t.state("exp_avg_sqs")}
    reference_rules.lamb(t.param, t.grad, state, lr=t.lr, betas=(h["beta1"], h["beta2"]),
                         eps=h["eps"], weight_decay=h["weight_decay"],
                         bias_correction=bool(h["bias_correction"]),
                         grad_averaging=bool(h["grad_averaging"]),
                         trust_clip=bool(h["trust_clip"]), always_adapt=bool(h["always_adapt"]),
                         decoupled_decay=t.flags["decoupled_weight_decay"],
                         maximize=t.flags["maximize"], max_lr=h["max_lr"] or None)


OPS = {
    "adam_": OpTable(adam_inputs, _grid(amsgrad=B, maximize=P, decoupled=P),
                     dict(amsgrad=True, maximize="mixed", decoupled="mixed"), adam_reference),
    "sgd_": OpTable(sgd_inputs, _grid(momentum_on=B, nesterov=B, maximize=P, **_NESTEROV_NEEDS_MOMENTUM),
                    dict(momentum_on=True, nesterov=True, maximize="mixed"), sgd_reference),
    "adagrad_": OpTable(adagrad_inputs, _grid(maximize=P), dict(maximize="mixed"), adagrad_reference),
    "rmsprop_": OpTable(rmsprop_inputs, _grid(centered=B, momentum_on=B, maximize=P),
                        dict(centered=True, momentum_on=True, maximize="mixed"), rmsprop_reference),
    "radam_": OpTable(radam_inputs, _grid(maximize=P, decoupled=P),
                      dict(maximize="mixed", decoupled="mixed"), radam_reference),
    "lion_": OpTable(lion_inputs, _grid(maximize=P), dict(maximize="mixed"), lion_reference),
    "nadam_": OpTable(nadam_inputs, _grid(maximize=P, decoupled=P),
                      dict(maximize="mixed", decoupled="mixed"), nadam_reference),
    "lars_": OpTable(lars_inputs, _grid(momentum_on=B, nesterov=B, maximize=P, **_NESTEROV_NEEDS_MOMENTUM),
                     dict(momentum_on=True, nesterov=True, maximize="mixed"), lars_reference),
    "lamb_": OpTable(lamb_inputs, _grid(maximize=P, decoupled=P),
                     dict(maximize="mixed", decoupled="mixed"), lamb_reference),
}
CASES = [(op, i) for op, table in OPS.items() for i in range(len(table.samples))]


def _full_case(op):
    """The index of the op's fullest sample (``OpTable.full``)."""
    return OPS[op].samples.index(OPS[op].full)


def _case_id(case):
    op, i = case
    words = [k if v is True else f"{k}={v}" for k, v in OPS[op].samples[i].items()
             if v not in (False, "none")]
    return "-".join([op] + words)


def _lr_tensors(lr, device):
    """One one-element lr tensor per group, on the params' device: float32
    and float64, 0-d and of shape (1,), mixed in one call."""
    kinds = [(torch.float32, ()), (torch.float64, (1,)), (torch.float32, (1,))]
    return [torch.full(shape, value, dtype=dtype, device=device)
            for value, (dtype, shape) in zip(lr, itertools.cycle(kinds))]


def _inputs(op, i, dtype, device, tensor_lr=False):
    named = OPS[op].inputs(dtype, device, **OPS[op].samples[i])
    if tensor_lr:
        named["lr"] = _lr_tensors(named["lr"], device)
    return named


def _is_tensor_lr(named):
    return bool(named["lr"]) and isinstance(named["lr"][0], torch.Tensor)


def _op(name, tensor_lr=False):
    return getattr(getattr(torch.ops.fused_optim, name), "tensor_lr" if tensor_lr else "default")


def _split(op, named):
    """The public op's (args, kwargs) for a call given by name."""
    signature = _ops.SIGNATURES[op]
    values = signature.arguments(**named)
    return (values[:signature.num_positional],
            dict(zip(signature.keywords, values[signature.num_positional:])))


def _call_public(op, named):
    args, kwargs = _split(op, named)
    _op(op, _is_tensor_lr(named))(*args, **kwargs)


def _call_fast(op, named, validate_only=False):
    """fused_optim._C's entry: every argument positional, keywords last."""
    name = ("validate_" if validate_only else "") + op + ("_tensor_lr" if _is_tensor_lr(named) else "")
    getattr(_C, name)(*_ops.SIGNATURES[op].arguments(**named))


OVERLOADS = [False, True]


def _overload_id(tensor_lr):
    return "tensor_lr" if tensor_lr else "float_lr"


@pytest.mark.parametrize("tensor_lr", OVERLOADS, ids=_overload_id)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(case, dtype, tensor_lr, device):
    op, i = case
    named = _inputs(op, i, dtype, device, tensor_lr)
    args, kwargs = _split(op, named)
    torch.library.opcheck(_op(op, tensor_lr), args, kwargs)


SCHEMAS = {
    "adam_": "fused_optim::adam_(Tensor(a!)[] params, Tensor(b!)[] grads, "
             "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, "
             "Tensor(f!)[] master_params, Tensor(g!)[] state_steps, int[] group_index, "
             "float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
             "bool[] maximize, bool[] decoupled_weight_decay, float[] max_grad_norm, "
             "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
             "*, bool amsgrad, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "adam_.tensor_lr": "fused_optim::adam_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
                       "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
                       "Tensor(e!)[] max_exp_avg_sqs, "
                       "Tensor(f!)[] master_params, Tensor(g!)[] state_steps, int[] group_index, "
                       "Tensor[] lr, float[] beta1, float[] beta2, float[] eps, "
                       "float[] weight_decay, "
                       "bool[] maximize, bool[] decoupled_weight_decay, float[] max_grad_norm, "
                       "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
                       "*, bool amsgrad, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "sgd_": "fused_optim::sgd_(Tensor(a!)[] params, Tensor(b!)[] grads, "
            "Tensor(c!)[] momentum_buffers, "
            "Tensor(d!)[] master_params, Tensor(e!)[] state_steps, int[] group_index, "
            "float[] lr, float[] momentum, float[] dampening, float[] weight_decay, "
            "bool[] maximize, float[] max_grad_norm, int[] new_momentum_buffers, "
            "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
            "*, bool nesterov, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "sgd_.tensor_lr": "fused_optim::sgd_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
                      "Tensor(c!)[] momentum_buffers, "
                      "Tensor(d!)[] master_params, Tensor(e!)[] state_steps, int[] group_index, "
                      "Tensor[] lr, float[] momentum, float[] dampening, float[] weight_decay, "
                      "bool[] maximize, float[] max_grad_norm, int[] new_momentum_buffers, "
                      "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
                      "*, bool nesterov, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "adagrad_": "fused_optim::adagrad_(Tensor(a!)[] params, Tensor(b!)[] grads, "
                "Tensor(c!)[] sums, "
                "Tensor(d!)[] master_params, Tensor(e!)[] state_steps, int[] group_index, "
                "float[] lr, float[] lr_decay, float[] weight_decay, float[] eps, "
                "bool[] maximize, float[] max_grad_norm, "
                "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
                "*, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "adagrad_.tensor_lr": "fused_optim::adagrad_.tensor_lr(Tensor(a!)[] params, "
                          "Tensor(b!)[] grads, "
                          "Tensor(c!)[] sums, "
                          "Tensor(d!)[] master_params, Tensor(e!)[] state_steps, "
                          "int[] group_index, "
                          "Tensor[] lr, float[] lr_decay, float[] weight_decay, float[] eps, "
                          "bool[] maximize, float[] max_grad_norm, "
                          "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
                          "*, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "rmsprop_": "fused_optim::rmsprop_(Tensor(a!)[] params, Tensor(b!)[] grads, "
                "Tensor(c!)[] square_avgs, Tensor(d!)[] grad_avgs, "
                "Tensor(e!)[] momentum_buffers, "
                "Tensor(f!)[] master_params, Tensor(g!)[] state_steps, int[] group_index, "
                "float[] lr, float[] alpha, float[] eps, float[] weight_decay, "
                "float[] momentum, "
                "bool[] maximize, float[] max_grad_norm, "
                "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
                "*, bool centered, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "rmsprop_.tensor_lr": "fused_optim::rmsprop_.tensor_lr(Tensor(a!)[] params, "
                          "Tensor(b!)[] grads, "
                          "Tensor(c!)[] square_avgs, Tensor(d!)[] grad_avgs, "
                          "Tensor(e!)[] momentum_buffers, "
                          "Tensor(f!)[] master_params, Tensor(g!)[] state_steps, "
                          "int[] group_index, "
                          "Tensor[] lr, float[] alpha, float[] eps, float[] weight_decay, "
                          "float[] momentum, "
                          "bool[] maximize, float[] max_grad_norm, "
                          "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
                          "*, bool centered, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "radam_": "fused_optim::radam_(Tensor(a!)[] params, Tensor(b!)[] grads, "
              "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
              "Tensor(e!)[] master_params, Tensor(f!)[] state_steps, int[] group_index, "
              "float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
              "bool[] maximize, bool[] decoupled_weight_decay, float[] max_grad_norm, "
              "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
              "*, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "radam_.tensor_lr": "fused_optim::radam_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
                        "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
                        "Tensor(e!)[] master_params, Tensor(f!)[] state_steps, int[] group_index, "
                        "Tensor[] lr, float[] beta1, float[] beta2, float[] eps, "
                        "float[] weight_decay, "
                        "bool[] maximize, bool[] decoupled_weight_decay, float[] max_grad_norm, "
                        "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
                        "*, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "nadam_": "fused_optim::nadam_(Tensor(a!)[] params, Tensor(b!)[] grads, "
              "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
              "Tensor(e!)[] master_params, Tensor(f!)[] state_steps, Tensor(g!)[] mu_products, "
              "int[] group_index, "
              "float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
              "float[] momentum_decay, "
              "bool[] maximize, bool[] decoupled_weight_decay, float[] max_grad_norm, "
              "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
              "*, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "nadam_.tensor_lr": "fused_optim::nadam_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
                        "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
                        "Tensor(e!)[] master_params, Tensor(f!)[] state_steps, "
                        "Tensor(g!)[] mu_products, int[] group_index, "
                        "Tensor[] lr, float[] beta1, float[] beta2, float[] eps, "
                        "float[] weight_decay, float[] momentum_decay, "
                        "bool[] maximize, bool[] decoupled_weight_decay, float[] max_grad_norm, "
                        "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
                        "*, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "lion_": "fused_optim::lion_(Tensor(a!)[] params, Tensor(b!)[] grads, "
             "Tensor(c!)[] exp_avgs, "
             "Tensor(d!)[] master_params, Tensor(e!)[] state_steps, int[] group_index, "
             "float[] lr, float[] beta1, float[] beta2, float[] weight_decay, float[] max_lr, "
             "bool[] maximize, float[] max_grad_norm, "
             "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
             "*, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "lion_.tensor_lr": "fused_optim::lion_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
                       "Tensor(c!)[] exp_avgs, "
                       "Tensor(d!)[] master_params, Tensor(e!)[] state_steps, int[] group_index, "
                       "Tensor[] lr, float[] beta1, float[] beta2, float[] weight_decay, float[] max_lr, "
                       "bool[] maximize, float[] max_grad_norm, "
                       "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
                       "*, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "lars_": "fused_optim::lars_(Tensor(a!)[] params, Tensor(b!)[] grads, "
             "Tensor(c!)[] momentum_buffers, "
             "Tensor(d!)[] master_params, Tensor(e!)[] state_steps, int[] group_index, "
             "float[] lr, float[] momentum, float[] dampening, float[] weight_decay, "
             "float[] trust_coeff, float[] eps, float[] trust_clip, float[] always_adapt, "
             "bool[] maximize, float[] max_grad_norm, int[] new_momentum_buffers, "
             "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, Tensor? tensor_sums, "
             "*, bool nesterov, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "lars_.tensor_lr": "fused_optim::lars_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
                       "Tensor(c!)[] momentum_buffers, "
                       "Tensor(d!)[] master_params, Tensor(e!)[] state_steps, int[] group_index, "
                       "Tensor[] lr, float[] momentum, float[] dampening, float[] weight_decay, "
                       "float[] trust_coeff, float[] eps, float[] trust_clip, float[] always_adapt, "
                       "bool[] maximize, float[] max_grad_norm, int[] new_momentum_buffers, "
                       "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, Tensor? tensor_sums, "
                       "*, bool nesterov, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "lamb_": "fused_optim::lamb_(Tensor(a!)[] params, Tensor(b!)[] grads, "
             "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
             "Tensor(e!)[] master_params, Tensor(f!)[] state_steps, int[] group_index, "
             "float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
             "float[] bias_correction, float[] grad_averaging, float[] trust_clip, "
             "float[] always_adapt, float[] max_lr, "
             "bool[] maximize, bool[] decoupled_weight_decay, float[] max_grad_norm, "
             "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, Tensor? tensor_sums, "
             "*, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    "lamb_.tensor_lr": "fused_optim::lamb_.tensor_lr(Tensor(a!)[] params, Tensor(b!)[] grads, "
                       "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
                       "Tensor(e!)[] master_params, Tensor(f!)[] state_steps, int[] group_index, "
                       "Tensor[] lr, float[] beta1, float[] beta2, float[] eps, "
                       "float[] weight_decay, "
                       "float[] bias_correction, float[] grad_averaging, float[] trust_clip, "
                       "float[] always_adapt, float[] max_lr, "
                       "bool[] maximize, bool[] decoupled_weight_decay, float[] max_grad_norm, "
                       "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, Tensor? tensor_sums, "
                       "*, bool stochastic_rounding, int[]? rounding_ids=None) -> ()",
    # The measuring overloads (Note [norms across shards]): the same
    # arguments, none written, the sums returned.
    "lamb_.measure": "fused_optim::lamb_.measure(Tensor[] params, Tensor[] grads, "
                     "Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
                     "Tensor[] master_params, Tensor[] state_steps, int[] group_index, "
                     "float[] lr, float[] beta1, float[] beta2, float[] eps, float[] weight_decay, "
                     "float[] bias_correction, float[] grad_averaging, float[] trust_clip, "
                     "float[] always_adapt, float[] max_lr, "
                     "bool[] maximize, bool[] decoupled_weight_decay, float[] max_grad_norm, "
                     "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, Tensor? tensor_sums, "
                     "*, bool stochastic_rounding, int[]? rounding_ids=None) -> Tensor",
    "lars_.measure_tensor_lr": "fused_optim::lars_.measure_tensor_lr(Tensor[] params, "
                               "Tensor[] grads, Tensor[] momentum_buffers, "
                               "Tensor[] master_params, Tensor[] state_steps, int[] group_index, "
                               "Tensor[] lr, float[] momentum, float[] dampening, "
                               "float[] weight_decay, float[] trust_coeff, float[] eps, "
                               "float[] trust_clip, float[] always_adapt, "
                               "bool[] maximize, float[] max_grad_norm, "
                               "int[] new_momentum_buffers, "
                               "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
                               "Tensor? tensor_sums, "
                               "*, bool nesterov, bool stochastic_rounding, "
                               "int[]? rounding_ids=None) -> Tensor",
}


def test_schemas():
    # Every op the extension registers has both its schemas here, and no
    # other op has any (of the measuring overloads, two are here).
    both = {key for name in _ops.OP_NAMES for key in (name, name + ".tensor_lr")}
    assert both <= set(SCHEMAS)
    assert set(_ops.OP_NAMES) == {key.split(".")[0] for key in SCHEMAS}
    for key, want in SCHEMAS.items():
        name, _, overload = key.partition(".")
        got = str(getattr(getattr(torch.ops.fused_optim, name), overload or "default")._schema)
        assert got == want, got
    # Two overloads per op, and two measuring ones for the ops that read
    # per-tensor norms (those whose schema takes tensor_sums); no more.
    reads_norms = {name for name in _ops.OP_NAMES if "tensor_sums" in SCHEMAS[name]}
    assert _ops.TENSOR_NORM_OPS == reads_norms
    for name in _ops.OP_NAMES:
        want = ["default", "tensor_lr"]
        if name in reads_norms:
            want += ["measure", "measure_tensor_lr"]
        assert sorted(getattr(torch.ops.fused_optim, name).overloads()) == sorted(want)


# ---------------------------------------------------------------------------
# Values against torch.optim's functional API (per tensor, its group's
# hyperparameters and flags)
# ---------------------------------------------------------------------------


def _clone(value):
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value.clone() if isinstance(value, torch.Tensor) else value


def _written(op, named):
    """The lists the op writes (grads only under AMP), by name."""
    out = {"params": named["params"]}
    out.update({n: named["states"].get(n, []) for n in _ops.SIGNATURES[op].state_lists})
    out["state_steps"] = named["steps"]
    out.update({n: named["scalar_states"].get(n, []) for n in _ops.SIGNATURES[op].scalar_state})
    return out


def _reference(op, named):
    """The same update by the op's reference (``OpTable.reference``), one
    tensor at a time with its group's hyperparameters and flags; returns
    the lists `_written` names."""
    named = _clone(named)
    for i in range(len(named["params"])):
        OPS[op].reference(_OneTensor(named, i))
    return _written(op, named)


@pytest.mark.parametrize("tensor_lr", OVERLOADS, ids=_overload_id)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_op_values_match_torch_functional(case, dtype, tensor_lr, device):
    op, i = case
    named = _inputs(op, i, dtype, device, tensor_lr)
    expected = _reference(op, named)
    grads_before = [g.clone() for g in named["grads"]]
    lr_before = _clone(named["lr"])
    _call_public(op, named)
    got = _written(op, named)
    assert list(got) == list(expected)
    for name in expected:
        assert len(got[name]) == len(expected[name])
        for ti, (a, b) in enumerate(zip(got[name], expected[name])):
            assert_close(a, b, msg=lambda m: f"{op} {name}[{ti}]: {m}")
    for g, g0 in zip(named["grads"], grads_before):
        assert torch.equal(g, g0), "grads are written only to unscale them (grad_scale)"
    if tensor_lr:
        for t, t0 in zip(named["lr"], lr_before):
            assert torch.equal(t, t0), "lr tensors are read, not written"


@pytest.mark.parametrize("op", list(OPS))
def test_groups_differing_in_maximize_equal_separate_calls(op, device):
    # One call whose groups differ in maximize (and, for Adam, in
    # decoupled_weight_decay) is the same as one call per group.
    i = _full_case(op)
    one_call = _inputs(op, i, torch.float32, device)
    separate = _clone(one_call)
    _call_public(op, one_call)
    for group in range(NGROUPS):
        tensors = [i for i, k in enumerate(GROUP_INDEX) if k == group]
        part = dict(separate)
        for key in ("params", "grads", "steps", "master_params"):
            part[key] = [separate[key][i] for i in tensors] if separate[key] else []
        part["states"] = {n: [lst[i] for i in tensors] for n, lst in separate["states"].items()}
        part["scalar_states"] = {n: [lst[i] for i in tensors]
                                 for n, lst in separate["scalar_states"].items()}
        part["group_index"] = [0] * len(tensors)
        part["lr"] = [separate["lr"][group]]
        part["hyper"] = {n: [v[group]] for n, v in separate["hyper"].items()}
        part["group_flags"] = {n: [v[group]] for n, v in separate["group_flags"].items()}
        if separate["new_state"] is not None:
            part["new_state"] = [tensors.index(i) for i in separate["new_state"] if i in tensors]
        _call_public(op, part)
    for name, lists in _written(op, one_call).items():
        for ti, (a, b) in enumerate(zip(lists, _written(op, separate)[name])):
            assert torch.equal(a, b), f"{op} {name}[{ti}]"


# ---------------------------------------------------------------------------
# Norms given by the caller (Note [norms across shards] in csrc/op_front.h):
# the `measure` overloads and the update's `tensor_sums`
# ---------------------------------------------------------------------------

NORM_CASES = [case for case in CASES if case[0] in _ops.TENSOR_NORM_OPS]


def _measure_op(name, tensor_lr=False):
    return getattr(getattr(torch.ops.fused_optim, name),
                   "measure_tensor_lr" if tensor_lr else "measure")


def _with_amp_and_clipping(named, device, found_inf=0.0):
    """AMP's scale (not a power of two) and clipping: group 0 not clipped,
    group 1 clipped, group 2 clamped to 1."""
    return {**named, "grad_scale": torch.tensor([3.0], device=device),
            "found_inf": torch.tensor([found_inf], device=device),
            "max_grad_norm": [float("inf"), 1.5, 100.0],
            "grad_norm": torch.tensor([3.7], dtype=torch.float64, device=device)}


@pytest.mark.parametrize("tensor_lr", OVERLOADS, ids=_overload_id)
@pytest.mark.parametrize("case", NORM_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_measure(case, dtype, tensor_lr, device):
    op, i = case
    args, kwargs = _split(op, _inputs(op, i, dtype, device, tensor_lr))
    torch.library.opcheck(_measure_op(op, tensor_lr), args, kwargs)


@pytest.mark.parametrize("amp_and_clipping", [False, True], ids=["plain", "amp-clip"])
@pytest.mark.parametrize("tensor_lr", OVERLOADS, ids=_overload_id)
@pytest.mark.parametrize("case", NORM_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_measure_then_update_with_the_sums_equals_the_plain_call(case, dtype, tensor_lr,
                                                                 amp_and_clipping, device):
    # What _dtensor does on shards, on whole tensors: the measured sums,
    # handed back, give the plain call's result bit for bit; measuring
    # writes nothing (no counter advances, no gradient is unscaled).
    op, i = case
    named = _inputs(op, i, dtype, device, tensor_lr)
    if amp_and_clipping:
        named = _with_amp_and_clipping(named, device)
    plain, split = _clone(named), _clone(named)
    _call_public(op, plain)
    args, kwargs = _split(op, split)
    sums = _measure_op(op, tensor_lr)(*args, **kwargs)
    assert sums.dtype == torch.float64 and sums.shape == (2 * len(SHAPES),)
    assert sums.device.type == torch.device(device).type
    for name, lists in {"grads": named["grads"], **_written(op, named)}.items():
        got = split["grads"] if name == "grads" else _written(op, split)[name]
        for t, (a, b) in enumerate(zip(got, lists)):
            assert torch.equal(a, b), f"measure wrote {name}[{t}]"
    assert (sums >= 0).all() and sums[len(SHAPES) + 4] == 0  # (tensor 4 is empty)
    _call_fast(op, {**split, "tensor_sums": sums})
    for name, lists in _written(op, plain).items():
        for t, (a, b) in enumerate(zip(lists, _written(op, split)[name])):
            assert torch.equal(a, b), f"{op} {name}[{t}]"


def test_measure_when_amp_skips_the_step_is_zeros(device):
    for op in sorted(_ops.TENSOR_NORM_OPS):
        named = _with_amp_and_clipping(_inputs(op, 0, torch.float32, device), device, found_inf=1.0)
        before = _clone(named)
        args, kwargs = _split(op, named)
        sums = _measure_op(op)(*args, **kwargs)
        if op == "lamb_":  # (LARS's sums are of its inputs: AMP does not change them)
            assert torch.equal(sums, torch.zeros_like(sums))
        for name, lists in _written(op, before).items():
            for a, b in zip(lists, _written(op, named)[name]):
                assert torch.equal(a, b)


# Per op: a sample without momentum (LARS's update is then its ratio times
# the gradient), the group whose ratio the norms set, unclipped, and the
# group that is not adapted.
GIVEN_SUMS = {"lars_": (dict(momentum_on=False, nesterov=False, maximize="none"), 2, 0),
              "lamb_": (dict(maximize="none", decoupled="none"), 1, 0)}


@pytest.mark.parametrize("op", sorted(GIVEN_SUMS))
def test_the_update_reads_the_given_sums(op, device):
    # Param sums times 4: twice the param norm, so twice the trust ratio and
    # the step of the adapted group; the other group's step is unchanged.
    flags, adapted, not_adapted = GIVEN_SUMS[op]
    i = OPS[op].samples.index(flags)
    named = _inputs(op, i, torch.float64, device)
    n = len(SHAPES)
    args, kwargs = _split(op, _clone(named))
    sums = _measure_op(op)(*args, **kwargs)
    scaled = sums.clone()
    scaled[:n] *= 4
    steps = []
    for given in (sums, scaled):
        call = _clone(named)
        _call_fast(op, {**call, "tensor_sums": given})
        steps.append([a - b for a, b in zip(call["params"], named["params"])])
    checked = set()
    for t, g in enumerate(GROUP_INDEX):
        if SHAPES[t] == (0,):
            continue
        if g == adapted:
            assert_close(steps[1][t], 2 * steps[0][t], rtol=1e-9, atol=0)
            checked.add(g)
        elif g == not_adapted:
            assert torch.equal(steps[1][t], steps[0][t])
            checked.add(g)
    assert checked == {adapted, not_adapted}


def _bad_tensor_sums(n, device):
    """Each bad tensor_sums and the error it must raise."""
    good = torch.ones(2 * n, dtype=torch.float64, device=device)
    out = {
        "short": (good[:-1], rf"tensor_sums must have shape \[{2 * n}\]"),
        "2d": (good.view(2, n), rf"tensor_sums must have shape \[{2 * n}\]"),
        "int64": (good.long(), "tensor_sums must be float32 or float64"),
        "strided": (torch.ones(4 * n, dtype=torch.float64, device=device)[::2],
                    "tensor_sums must be contiguous"),
    }
    if torch.device(device).type != "cpu":
        out["on_cpu"] = (good.cpu(), "tensor_sums must be on cuda")
    return out


@pytest.mark.parametrize("variant", ["short", "2d", "int64", "strided", "on_cpu", "measure"])
@pytest.mark.parametrize("op", sorted(_ops.TENSOR_NORM_OPS))
def test_bad_tensor_sums_are_refused_before_writing(op, variant, device):
    if variant == "on_cpu" and torch.device(device).type == "cpu":
        pytest.skip("sums on another device than the params need a GPU")
    i = _full_case(op)
    named = _inputs(op, i, torch.float32, device)
    before = _clone(named)
    if variant == "measure":  # the measuring call computes the sums: it takes none
        args, kwargs = _split(op, {**named, "tensor_sums": torch.ones(2 * len(SHAPES))})
        calls = [lambda: _measure_op(op)(*args, **kwargs)]
        match = "tensor_sums must be None"
    else:
        sums, match = _bad_tensor_sums(len(SHAPES), device)[variant]
        bad = {**named, "tensor_sums": sums}
        calls = [lambda: _call_public(op, bad), lambda: _call_fast(op, bad),
                 lambda: _call_fast(op, bad, validate_only=True)]
    for call in calls:
        with pytest.raises(RuntimeError, match=match):
            call()
        for name, lists in _written(op, before).items():
            for a, b in zip(lists, _written(op, named)[name]):
                assert torch.equal(a, b), f"{op} {variant}: {name} written before the error"


def test_tensor_sums_only_for_ops_that_read_norms():
    named = _inputs("adam_", 0, torch.float32, "cpu")
    with pytest.raises(ValueError, match="reads no per-tensor norms"):
        _ops.SIGNATURES["adam_"].arguments(**named, tensor_sums=torch.ones(12))


# ---------------------------------------------------------------------------
# Op argument validation: nothing is written when it raises
# ---------------------------------------------------------------------------

OP_ERRORS = (RuntimeError, ValueError, IndexError)


def _bad_variants(op, named):
    """Each variant: a copy of the call's arguments with one thing wrong,
    and the error it must raise (a regex)."""
    out = {}

    def variant(name, match, **changes):
        out[name] = ({**named, **changes}, match)

    gi, lr = named["group_index"], named["lr"]
    variant("grads_shorter", "grads has 5 tensors but params has 6", grads=named["grads"][:-1])
    variant("group_index_out_of_range", r"group_index\[5\] = 3 is out of range for 3 groups",
            group_index=gi[:-1] + [NGROUPS])
    variant("group_index_negative", r"group_index\[5\] = -1 is out of range",
            group_index=gi[:-1] + [-1])
    variant("group_index_shorter", "group_index has 5 entries but there are 6 tensors",
            group_index=gi[:-1])
    variant("rounding_ids_shorter", "rounding_ids has 5 entries but there are 6 tensors",
            rounding_ids=list(range(5)))
    # lr, which counts the groups, has fewer entries than the groups used
    variant("lr_shorter", "has 3 entries but lr has 2", lr=lr[:-1])
    first_hyper = _ops.SIGNATURES[op].hyperparameters[0]
    variant("hyper_shorter", f"{first_hyper} has 2 entries but lr has 3",
            hyper={**named["hyper"], first_hyper: named["hyper"][first_hyper][:-1]})
    grads = list(named["grads"])
    grads[1] = grads[1][:-1]  # a grad with fewer elements than its param
    variant("grad_numel", r"grads\[1\] has shape \[4098\] but params\[1\] has shape \[4099\]",
            grads=grads)
    for flag in _ops.SIGNATURES[op].group_flags:  # per-group flag lists of the wrong length
        flags = named["group_flags"]
        variant(f"{flag}_shorter", f"{flag} has 2 entries but lr has 3",
                group_flags={**flags, flag: flags[flag][:-1]})
        variant(f"{flag}_longer", f"{flag} has 4 entries but lr has 3",
                group_flags={**flags, flag: flags[flag] + [False]})
    for name in _ops.SIGNATURES[op].scalar_state:  # (nadam_'s mu_products)
        values = named["scalar_states"][name]

        def bad_scalar(k, tensor):
            bad = list(values)
            bad[k] = tensor
            return {**named["scalar_states"], name: bad}

        variant("scalar_state_shorter", f"{name} has 5 tensors but params has 6",
                scalar_states={**named["scalar_states"], name: values[:-1]})
        variant("scalar_state_of_two_elements",
                rf"{name}\[2\] must be a one-element float32 or float64 tensor",
                scalar_states=bad_scalar(2, torch.ones(2)))
        variant("scalar_state_float16", rf"{name}\[1\] must be a one-element float32 or float64 tensor",
                scalar_states=bad_scalar(1, torch.tensor(1.0, dtype=torch.float16)))
    if "nesterov" in named["modes"]:  # (SGD's modes: MomentumModes in op_specs.h)
        variant("nesterov_without_buffers", rf"{op}: nesterov=True needs momentum buffers",
                states={k: v for k, v in named["states"].items() if k != "momentum_buffers"},
                new_state=[], modes={**named["modes"], "nesterov": True})
    if _is_tensor_lr(named):
        device = lr[0].device

        def bad_lr(k, tensor):
            bad = list(lr)
            bad[k] = tensor
            return bad

        variant("lr_tensor_two_elements", "lr tensor must be a one-element tensor",
                lr=bad_lr(1, torch.full((2,), 1e-3, dtype=torch.float32, device=device)))
        variant("lr_tensor_empty", "lr tensor must be a one-element tensor",
                lr=bad_lr(1, torch.empty(0, dtype=torch.float32, device=device)))
        variant("lr_tensor_float16", "lr tensor must be float32 or float64, got Half",
                lr=bad_lr(2, torch.full((), 1e-3, dtype=torch.float16, device=device)))
        variant("lr_tensor_int64", "lr tensor must be float32 or float64, got Long",
                lr=bad_lr(0, torch.full((1,), 1, dtype=torch.int64, device=device)))
        if device.type != "cpu":
            variant("lr_tensor_on_cpu", "lr tensor is on cpu", lr=bad_lr(0, lr[0].cpu()))
    return out


def _variant_names(op, tensor_lr):
    """The names of the variants `_bad_variants` makes of the op's calls,
    read from its schema (its per-group flags, scalar state and modes)."""
    signature = _ops.SIGNATURES[op]
    names = ["grads_shorter", "group_index_out_of_range", "group_index_negative",
             "group_index_shorter", "rounding_ids_shorter", "lr_shorter", "hyper_shorter",
             "grad_numel"]
    names += [f"{flag}_{end}" for flag in signature.group_flags for end in ("shorter", "longer")]
    if signature.scalar_state:
        names += ["scalar_state_shorter", "scalar_state_of_two_elements", "scalar_state_float16"]
    if "nesterov" in signature.modes:
        names.append("nesterov_without_buffers")
    if tensor_lr:
        names += ["lr_tensor_two_elements", "lr_tensor_float16", "lr_tensor_int64",
                  "lr_tensor_empty", "lr_tensor_on_cpu"]
    return names


ERROR_CASES = [(op, tensor_lr, variant) for op in OPS for tensor_lr in OVERLOADS
               for variant in _variant_names(op, tensor_lr)]


@pytest.mark.parametrize("tensor_lr", OVERLOADS, ids=_overload_id)
@pytest.mark.parametrize("op", list(OPS))
def test_every_bad_variant_is_a_case(op, tensor_lr):
    # (on the CPU, where an lr tensor cannot be on another device)
    named = _inputs(op, _full_case(op), torch.float32, "cpu", tensor_lr)
    names = set(_variant_names(op, tensor_lr)) - {"lr_tensor_on_cpu"}
    assert set(_bad_variants(op, named)) == names


@pytest.mark.parametrize("case", ERROR_CASES,
                         ids=lambda c: f"{c[0]}-{_overload_id(c[1])}-{c[2]}")
def test_op_rejects_bad_arguments_before_writing(case, device):
    op, tensor_lr, variant = case
    if variant == "lr_tensor_on_cpu" and device == "cpu":
        pytest.skip("an lr tensor on another device than the params needs a GPU")
    i = _full_case(op)
    named = _inputs(op, i, torch.float32, device, tensor_lr)
    bad, match = _bad_variants(op, named)[variant]
    written = [named["grads"], *_written(op, named).values()]
    if tensor_lr:
        written.append(named["lr"])
    before = _clone(written)
    # The public op, the fast entry and its validate-only twin all refuse it.
    for call in (lambda: _call_public(op, bad), lambda: _call_fast(op, bad),
                 lambda: _call_fast(op, bad, validate_only=True)):
        with pytest.raises(OP_ERRORS, match=match):
            call()
        for lst, lst0 in zip(written, before):
            for t, t0 in zip(lst, lst0):
                assert torch.equal(t, t0), f"{op} {variant}: a tensor was written before the error"
