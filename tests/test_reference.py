"""fused_optim._reference is the readable statement of each update rule. The
kernels must agree with it in float64 (where rounding differences vanish
below assert_close's tolerances), step after step, on params and state."""

import pytest
import torch

import fused_optim
from fused_optim import _reference

CASES = [
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True,
                  decoupled_weight_decay=False)),
    ("AdamW", dict(lr=1e-2, betas=(0.3, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=False, maximize=False,
                   decoupled_weight_decay=True)),
    ("SGD", dict(lr=1e-2, momentum=0.9, dampening=0.2, weight_decay=0.1, nesterov=False, maximize=False)),
    ("SGD", dict(lr=1e-2, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=True)),
    ("Adagrad", dict(lr=1e-1, lr_decay=0.01, weight_decay=0.1, eps=1e-10, maximize=False)),
    ("RMSprop", dict(lr=1e-2, alpha=0.3, eps=1e-8, weight_decay=0.1, momentum=0.5, centered=True, maximize=True)),
    ("RMSprop", dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False)),
    ("RAdam", dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, maximize=True,
                   decoupled_weight_decay=False)),
    ("RAdam", dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, maximize=False,
                   decoupled_weight_decay=True)),
    ("NAdam", dict(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, momentum_decay=0.01,
                   maximize=True, decoupled_weight_decay=False)),
    ("NAdam", dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, momentum_decay=4e-3,
                   maximize=False, decoupled_weight_decay=True)),
    ("Lion", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, maximize=False)),
    ("Lion", dict(lr=3e-3, betas=(0.5, 0.9), weight_decay=0.0, maximize=True)),
    ("Lars", dict(lr=0.5, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
                  trust_coeff=0.02, eps=1e-6, trust_clip=True, always_adapt=False, maximize=True)),
    ("Lars", dict(lr=1.0, momentum=0.8, dampening=0.0, weight_decay=0.0, nesterov=True,
                  trust_coeff=0.01, eps=1e-8, trust_clip=False, always_adapt=True, maximize=False)),
    ("Lars", dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=1e-4, nesterov=False,
                  trust_coeff=0.001, eps=1e-8, trust_clip=False, always_adapt=False, maximize=False)),
]


@pytest.mark.parametrize("name,hyper", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_kernels_match_reference_in_float64(name, hyper):
    torch.manual_seed(0)
    shapes = [(1,), (9,), (4099,), (3, 5)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    ref_params = [p.detach().clone() for p in params]
    kwargs = {k: v for k, v in hyper.items() if not (name == "AdamW" and k == "decoupled_weight_decay")}
    opt = getattr(fused_optim, name)(params, **kwargs)
    ref_state = [None] * len(params)
    rule = getattr(_reference, name.lower().replace("adamw", "adam"))
    for _ in range(10):
        for i, (p, q) in enumerate(zip(params, ref_params)):
            g = torch.randn_like(p)
            p.grad = g
            if ref_state[i] is None:
                # the reference's state starts as the optimizer's does
                ref_state[i] = {k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else {}
                if name in ("Adam", "AdamW", "RMSprop", "RAdam", "NAdam", "Lion") and not ref_state[i]:
                    ref_state[i] = _initial_state(name, q, hyper)
            rule(q, g, ref_state[i], **hyper)
        opt.step()
        for p, q, st in zip(params, ref_params, ref_state):
            torch.testing.assert_close(p.detach(), q)
            for key, value in st.items():
                torch.testing.assert_close(opt.state[p][key], value, msg=f"{name} state {key}")


def _initial_state(name, param, hyper):
    zeros = lambda: torch.zeros_like(param)  # noqa: E731
    if name == "Lion":
        return {"exp_avg": zeros()}  # (no step counter)
    state = {"step": torch.tensor(0.0)}
    if name in ("RAdam", "NAdam"):
        state.update(exp_avg=zeros(), exp_avg_sq=zeros())
        if name == "NAdam":
            state["mu_product"] = torch.tensor(1.0)
    elif name in ("Adam", "AdamW"):
        state.update(exp_avg=zeros(), exp_avg_sq=zeros())
        if hyper["amsgrad"]:
            state["max_exp_avg_sq"] = zeros()
    else:
        state["square_avg"] = zeros()
        if hyper["centered"]:
            state["grad_avg"] = zeros()
        if hyper["momentum"] > 0:
            state["momentum_buffer"] = zeros()
    return state
