"""NAdam's per-param scalar state, mu_product (Note [per-tensor scalar
state] in csrc/include/fused_optim/hyperparams.h): the table-driven suites
compare it with torch.optim.NAdam after every step (tests/harness.py,
SCALAR_STATE_KEYS); these tests pin what they do not: that the op reads it
from the state (a value written there is the one used, as in torch), its
dtype under a float64 default dtype, and that a refused call leaves it."""

from __future__ import annotations

import copy

import pytest
import torch

import fused_optim


def _pair(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    p = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in (1, 33, 4099)]
    q = [torch.nn.Parameter(t.detach().clone()) for t in p]
    ours = fused_optim.NAdam(p, lr=0.02, momentum_decay=0.01, **kwargs)
    ref = torch.optim.NAdam(q, lr=0.02, momentum_decay=0.01, foreach=False, **kwargs)
    return p, q, ours, ref


def _step(params, opt, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
    opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mu_product_written_into_the_state_is_used(dtype):
    p, q, ours, ref = _pair(dtype)
    for s in range(3):
        _step(p, ours, s)
        _step(q, ref, s)
    for a, b in zip(p, q):
        assert ours.state[a]["mu_product"].item() == ref.state[b]["mu_product"].item()
        ours.state[a]["mu_product"].fill_(0.25)
        ref.state[b]["mu_product"].fill_(0.25)
    before = [a.detach().clone() for a in p]
    for s in range(3, 12):
        _step(p, ours, s)
        _step(q, ref, s)
        for a, b in zip(p, q):
            torch.testing.assert_close(a, b)
            sa, sb = ours.state[a]["mu_product"], ref.state[b]["mu_product"]
            assert sa.dtype == sb.dtype == torch.float32 and sa.dim() == 0
            assert sa.item() == sb.item()
    # and it mattered: the same run without the change ends elsewhere
    p2, _, ours2, _ = _pair(dtype)
    for s in range(12):
        _step(p2, ours2, s)
    assert any(not torch.equal(a, c) for a, c in zip(p, p2))
    assert all(not torch.equal(a, c) for a, c in zip(p, before))


def test_a_checkpoint_with_numbers_for_mu_product_and_step_loads_as_torchs():
    # torch's load makes 0-d tensors of numbers (a hand-written or older
    # checkpoint); ours takes them as torch does, and both go on alike.
    p, q, ours, ref = _pair()
    for s in range(3):
        _step(p, ours, s)
        _step(q, ref, s)
    saved = ref.state_dict()
    for state in saved["state"].values():
        state["mu_product"], state["step"] = state["mu_product"].item(), state["step"].item()
    # (copies: a load keeps the tensors it is given, which would be shared)
    ours.load_state_dict(copy.deepcopy(saved))
    ref.load_state_dict(copy.deepcopy(saved))
    for s in range(3, 6):
        _step(p, ours, s)
        _step(q, ref, s)
    for a, b in zip(p, q):
        torch.testing.assert_close(a, b)
        for key in ("step", "mu_product"):
            assert ours.state[a][key].dim() == 0
            assert ours.state[a][key].item() == pytest.approx(ref.state[b][key].item(), rel=1e-6)


def test_float64_default_dtype_keeps_float64_scalars():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        p, q, ours, ref = _pair(torch.float64)
        for s in range(10):
            _step(p, ours, s)
            _step(q, ref, s)
        for a, b in zip(p, q):
            for key in ("step", "mu_product"):
                assert ours.state[a][key].dtype == ref.state[b][key].dtype == torch.float64
                assert ours.state[a][key].item() == ref.state[b][key].item()
            torch.testing.assert_close(a, b)
    finally:
        torch.set_default_dtype(previous)


def test_refused_step_leaves_mu_product():
    p, _, ours, _ = _pair()
    _step(p, ours, 0)
    saved = {i: ours.state[a]["mu_product"].clone() for i, a in enumerate(p)}
    for a in p:
        a.grad = torch.randn_like(a)
    p[2].grad = p[2].grad.to_sparse()  # refused, before any write
    with pytest.raises(RuntimeError, match="sparse"):
        ours.step()
    for i, a in enumerate(p):
        assert torch.equal(ours.state[a]["mu_product"], saved[i])
