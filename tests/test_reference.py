"""fused_optim._reference is the readable statement of each update rule. The
kernels must agree with it in float64 (where rounding differences vanish
below assert_close's tolerances), step after step, on params and state."""

import inspect

import pytest
import torch

import fused_optim
from fused_optim import _reference
from harness import assert_states_equal
from optim_configs import ROWS

CASES = [(row.name, hyper) for row in ROWS for hyper in row.reference_cases]


@pytest.mark.parametrize("name,hyper", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_kernels_match_reference_in_float64(name, hyper):
    torch.manual_seed(0)
    shapes = [(1,), (9,), (4099,), (3, 5)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    ref_params = [p.detach().clone() for p in params]
    cls = getattr(fused_optim, name)
    # (the rule's keywords that the class takes: AdamW has no
    # decoupled_weight_decay; and no clipping, which Lamb does by default)
    kwargs = {k: v for k, v in hyper.items() if k in inspect.signature(cls).parameters}
    opt = cls(params, **kwargs, max_grad_norm=None)
    ref_state = [None] * len(params)
    rule = getattr(_reference, name.lower().replace("adamw", "adam"))
    for _ in range(10):
        for i, (p, q) in enumerate(zip(params, ref_params)):
            g = torch.randn_like(p)
            p.grad = g
            if ref_state[i] is None:
                # the state made at construction (Adagrad's), or none: the
                # rule makes it at its first step
                ref_state[i] = {k: v.clone() for k, v in opt.state.get(p, {}).items()}
            rule(q, g, ref_state[i], **hyper)
        opt.step()
        for p, q, st in zip(params, ref_params, ref_state):
            torch.testing.assert_close(p.detach(), q)
            assert set(opt.state.get(p, {})) == set(st), name
            for key, value in st.items():
                torch.testing.assert_close(opt.state[p][key], value, msg=f"{name} state {key}")


# ----- the Lamb reference against timm's Lamb ------------------------------------------------

LAMB_GROUPS = [
    dict(lr=0.02, weight_decay=0.01),
    dict(lr=0.01, betas=(0.8, 0.99), eps=1e-5, weight_decay=0.1, bias_correction=False,
         grad_averaging=False, trust_clip=True),
    dict(lr=0.03, weight_decay=0.0, always_adapt=True),
    dict(lr=0.005, weight_decay=0.0),
    dict(lr=0.02, betas=(0.5, 0.9), weight_decay=0.05, decoupled_decay=True, trust_clip=True),
]


@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no_clip", "clip"])
def test_lamb_reference_matches_timm_in_float64(max_grad_norm):
    # The reference class (fused_optim._reference.Lamb over .lamb, written
    # from the paper's pseudocode) against timm's Lamb, an independent
    # implementation, in float64 over 12 steps, every param given a
    # gradient every step (timm's step counter is the group's). Params are
    # scaled per group so that trust_clip bites (||p|| > ||u||), one is all
    # zeros (ratio 1). Rounding aside they agree exactly without clipping;
    # with clipping (the global norm is ~145: every step clips) timm's
    # factor lacks torch's + 1e-6 in max_grad_norm / (norm + 1e-6): a
    # relative difference of ~1e-6 / norm in the gradients, linear in
    # exp_avg, quadratic in exp_avg_sq, and only through eps in the
    # scale-free update; rtol 1e-7 covers twice that with room.
    from test_lamb import timm_lamb

    timm_cls = timm_lamb()
    sizes, scales = (1, 7, 33, 4099, 5), (1.0, 4.0, 1.0, 1.0, 2.0)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(n, generator=gen, dtype=torch.float64) * scales[k] * (i < len(sizes) - 1)
             for k in range(len(LAMB_GROUPS)) for i, n in enumerate(sizes)]
    ref_params = [torch.nn.Parameter(t.clone()) for t in start]
    timm_params = [torch.nn.Parameter(t.clone()) for t in start]

    def groups(params):
        n = len(sizes)
        return [dict(params=params[k * n:(k + 1) * n], **g) for k, g in enumerate(LAMB_GROUPS)]

    ref = _reference.Lamb(groups(ref_params), max_grad_norm=max_grad_norm)
    theirs = timm_cls(groups(timm_params), max_grad_norm=max_grad_norm)
    tol = dict(rtol=1e-7, atol=1e-7) if max_grad_norm else dict(rtol=1e-12, atol=1e-12)
    for step in range(12):
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in start]
        for p, q, g in zip(ref_params, timm_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        theirs.step()
        for i, (p, q, g) in enumerate(zip(ref_params, timm_params, grads)):
            where = f"step {step} param {i}"
            torch.testing.assert_close(p.detach(), q.detach(), **tol, msg=lambda m: f"{where}: {m}")
            assert float(ref.state[p]["step"]) == theirs.param_groups[i // len(sizes)]["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                expected = theirs.state[q][key]
                scale = float(expected.abs().max())
                torch.testing.assert_close(ref.state[p][key], expected, rtol=tol["rtol"],
                                           atol=tol["atol"] * scale,
                                           msg=lambda m: f"{where} {key}: {m}")
            assert torch.equal(p.grad, g), f"{where}: the reference wrote the gradient"
    moved = [not torch.equal(p.detach(), t) for p, t in zip(ref_params, start)]
    assert all(moved)


def test_reference_clips_by_the_kernels_factor():
    # Clipping by max_grad_norm: the reference (the oracle of the tests, and
    # the step of cautious groups) multiplies each gradient by the factor
    # the fused step's element loops use, rounded as theirs (the norm a
    # float32 tensor, float64 with a float64 gradient; the factor in the
    # compute dtype). Then the moments, which only add the clipped gradient
    # to themselves (without grad_averaging: m * beta1 + g, v * beta2 +
    # (1 - beta2) * g * g, the same operations on both sides), are equal
    # bit for bit, over steps where every gradient is clipped. A factor
    # rounded otherwise (in float64, then to float32) is off by an ulp on
    # some steps, and a moment that cancels (m * beta1 + g near 0) makes
    # that ulp a relative error beyond assert_close's float32 tolerance.
    # (float32: the reference sums the squares in its own order, which
    # rounding the norm to float32 hides; a float64 norm differs in its
    # last bits, as any two summation orders do.)
    gen = torch.Generator().manual_seed(0)
    sizes = (1, 7, 4099, 33)
    start = [torch.randn(n, generator=gen) for n in sizes]
    ours_params = [torch.nn.Parameter(t.clone()) for t in start]
    ref_params = [torch.nn.Parameter(t.clone()) for t in start]
    kwargs = dict(lr=1e-3, betas=(0.9, 0.99), grad_averaging=False, max_grad_norm=0.5)
    ours = fused_optim.Lamb(ours_params, **kwargs)
    ref = _reference.Lamb(ref_params, **kwargs)
    for step in range(8):
        for p, q in zip(ours_params, ref_params):
            g = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 30
            p.grad, q.grad = g, g.clone()
        ours.step()
        ref.step()
        assert_states_equal(ours, ours_params, ref, ref_params, ("exp_avg", "exp_avg_sq"),
                            f"step {step}")
