"""Sparse gradients (SGD, Adagrad) and complex parameters (all five):
results equal torch.optim's for-loop on the same inputs."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from harness import (
    P,
    Run,
    assert_moved,
    assert_runs_close,
    assert_same_state,
    run_parity,
    snapshot_params,
)
from optim_configs import ONE_PER_OPTIMIZER, OPTIM_CONFIGS, SPARSE_OK

# Sparse grads are supported only without weight_decay (torch raises
# otherwise; see test_errors.test_sparse_grad_with_weight_decay_rejected_atomically).
SPARSE_CONFIGS = [c for c in OPTIM_CONFIGS
                  if c.name in SPARSE_OK and c.kwargs.get("weight_decay", 0) == 0]


def _sparse_grad(shape, step, index, dtype, nnz_rows=6, empty=False):
    """An uncoalesced COO grad: rows picked with repeats (as nn.Embedding's
    backward produces), fresh values every step."""
    gen = torch.Generator().manual_seed(1000 * step + index)
    n = 0 if empty else nnz_rows
    rows = torch.randint(0, shape[0], (n,), generator=gen)
    if n >= 2:
        rows[1] = rows[0]  # a duplicate index: the sum must be taken
    values = torch.randn((n,) + tuple(shape[1:]), generator=gen, dtype=torch.float64).to(dtype)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape, check_invariants=True)


class _SparseRuns:
    """torch and ours over: group 1 = [sparse (50, 4), dense (7,)],
    group 2 = [sparse (20, 3)]."""

    def __init__(self, cfg, dtype=torch.float32):
        gen = torch.Generator().manual_seed(0)
        init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)
                for s in ((50, 4), (7,), (20, 3))]
        self.sparse = [True, False, True]
        self.t = [x.clone().requires_grad_() for x in init]
        self.o = [x.clone().requires_grad_() for x in init]
        kw = cfg.kwargs
        self.topt = cfg.torch_cls([{"params": self.t[:2]}, {"params": self.t[2:]}],
                                  **{**kw, "foreach": False})
        self.oopt = cfg.ours_cls([{"params": self.o[:2]}, {"params": self.o[2:]}], **kw)

    def step(self, s, empty=False):
        for i, (pt, po) in enumerate(zip(self.t, self.o)):
            if self.sparse[i]:
                g = _sparse_grad(pt.shape, s, i, pt.dtype, empty=empty)
            else:
                g = torch.randn(pt.shape, generator=torch.Generator().manual_seed(77 + s),
                                dtype=torch.float64).to(pt.dtype)
            pt.grad = g.clone()
            po.grad = g.clone()
        self.topt.step()
        self.oopt.step()

    def compare(self, where):
        for i, (pt, po) in enumerate(zip(self.t, self.o)):
            torch.testing.assert_close(po.detach(), pt.detach(), msg=lambda m: f"{where} param {i}: {m}")
            assert (po in self.oopt.state) == (pt in self.topt.state), f"{where} param {i} state"
            # torch keeps SGD's momentum buffer of a sparse grad sparse; ours
            # may keep it dense: compared by value (densified), same dtype/shape.
            assert_same_state(self.oopt.state.get(po, {}), self.topt.state.get(pt, {}),
                              f"{where} param {i}")


@pytest.mark.parametrize("cfg", SPARSE_CONFIGS, ids=str)
def test_sparse_grads_match_torch(cfg):
    runs = _SparseRuns(cfg)
    before = [p.detach().clone() for p in runs.o]
    for s in range(10):
        runs.step(s, empty=(s == 4))  # step 4: a sparse grad with no entries
        runs.compare(f"{cfg} step {s}")
    for p, b in zip(runs.o, before):
        assert not torch.equal(p.detach(), b)


@pytest.mark.parametrize("cfg", SPARSE_CONFIGS, ids=str)
def test_coalesced_sparse_grads_into_packed_state(cfg):
    """Coalesced sparse gradients whose values are scalars (``dense.to_sparse()``),
    after dense steps made the state: torch's CPU kernel that adds such a
    tensor into a dense one starting at an offset into its storage (as
    state in the arena does) writes the sum at the wrong place, past the
    tensor (Note [state arena]). Every param and state tensor, the
    neighbours' included, must equal torch's."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(3, 16), (45,), (5, 4), (7,)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    t = [x.clone().requires_grad_() for x in init]
    o = [x.clone().requires_grad_() for x in init]
    topt = cfg.torch_cls(t, **{**cfg.kwargs, "foreach": False})
    oopt = cfg.ours_cls(o, **cfg.kwargs)
    for s in range(8):
        for i, (pt, po) in enumerate(zip(t, o)):
            g = torch.randn(pt.shape, generator=gen)
            if s >= 2 and (i + s) % 2 == 0:  # (dense steps first: dense state)
                g = (g * (torch.rand(pt.shape, generator=gen) < 0.5)).to_sparse()
                assert g.is_coalesced() and g.sparse_dim() == g.dim()
            pt.grad, po.grad = g.clone(), g.clone()
        topt.step()
        oopt.step()
        for i, (pt, po) in enumerate(zip(t, o)):
            torch.testing.assert_close(po.detach(), pt.detach(),
                                       msg=lambda m: f"{cfg} step {s} param {i}: {m}")
            assert_same_state(oopt.state.get(po, {}), topt.state.get(pt, {}),
                              f"{cfg} step {s} param {i}")


@pytest.mark.parametrize("cfg", SPARSE_CONFIGS, ids=str)
def test_sparse_embedding_model_matches_torch(cfg):
    """End to end: nn.Embedding(sparse=True) + nn.Linear, backward, step."""
    torch.manual_seed(0)
    model_t = torch.nn.Sequential(torch.nn.Embedding(100, 8, sparse=True), torch.nn.Linear(8, 1))
    model_o = copy.deepcopy(model_t)
    opt_t = cfg.torch_cls(model_t.parameters(), **{**cfg.kwargs, "foreach": False})
    opt_o = cfg.ours_cls(model_o.parameters(), **cfg.kwargs)
    for s in range(8):
        idx = torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(s))
        idx[:4] = idx[0]  # repeated rows
        target = torch.randn(16, 1, generator=torch.Generator().manual_seed(100 + s))
        for model, opt in ((model_t, opt_t), (model_o, opt_o)):
            opt.zero_grad()
            loss = ((model(idx) - target) ** 2).mean()
            loss.backward()
            assert model[0].weight.grad.is_sparse
            opt.step()
        for (n, pt), po in zip(model_t.named_parameters(), model_o.parameters()):
            torch.testing.assert_close(po, pt, msg=lambda m: f"{cfg} step {s} {n}: {m}")


@pytest.mark.parametrize("cfg", OPTIM_CONFIGS, ids=str)
def test_complex_params_match_torch(cfg, device):
    # Complex params (updated like torch: as pairs of reals where torch uses
    # view_as_real) next to a real param in the same group.
    specs = [P((7,), dtype=torch.complex64), P((3, 5), dtype=torch.complex64),
             P((4099,), dtype=torch.complex64), P((9,)), P((8,), layout="offset",
                                                           dtype=torch.complex64)]
    run_parity(cfg, [({}, specs)], 10, device=device)


@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_complex128_params_match_torch(cfg, device):
    specs = [P((7,), dtype=torch.complex128), P((1031,), dtype=torch.complex128)]
    run_parity(cfg, [({}, specs)], 10, device=device)


@pytest.mark.parametrize("cfg", [c for c in ONE_PER_OPTIMIZER
                                 if "fused" in inspect.signature(c.ours_cls).parameters], ids=str)
def test_complex_params_under_fused_true(cfg, device):
    # torch's fused step refuses complex params; ours steps them as it does
    # under fused=None (README, implementation keywords): the results are
    # torch's for-loop's.
    specs = [P((7,), dtype=torch.complex64), P((1031,), dtype=torch.complex64), P((9,))]
    refused = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    refused.grad = torch.ones_like(refused)
    with pytest.raises(RuntimeError, match="requires all the params to be floating point"):
        cfg.torch_cls([refused], fused=True).step()
    ref = Run(cfg.torch_cls, [({}, specs)], {**cfg.kwargs, "foreach": False}, device=device)
    ours = Run(cfg.ours_cls, [({}, specs)], {**cfg.kwargs, "fused": True}, device=device)
    initial = snapshot_params(ours)
    for s in range(5):
        for run in (ref, ours):
            run.set_grads(s)
            run.opt.step()
        assert_runs_close(ours, ref, f"{cfg} fused=True step {s}")
    assert_moved(ours, initial, str(cfg))
