"""CUDA-only checks of the multi-tensor kernels (csrc/cuda). The rest of the
suite already runs on CUDA through the DEVICES list (conftest.py); these
cover what only the CUDA launch planner can get wrong: many launches, tensors
of many chunks, CUDA against the CPU kernels, and 64-bit indexing.

They run where torch sees a GPU and fused_optim was built with CUDA, and
are skipped elsewhere (this module's marker), e.g. in CI.
"""

import pytest
import torch

import fused_optim

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and fused_optim.cuda_built()),
    reason="needs a GPU and a CUDA build of fused_optim",
)

OPTIMIZERS = [
    ("Adam", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("AdamW", dict(lr=1e-2)),
    ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
    ("Adagrad", dict(lr=1e-2, weight_decay=0.1)),
    ("RMSprop", dict(lr=1e-2, momentum=0.9, centered=True)),
]


def _params(sizes, device, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(n, generator=generator, dtype=dtype).to(device))
        for n in sizes
    ]


def _set_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device)


def _mixed_sizes(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # from single elements (biases) to ~70K (matrices), with empty ones
    sizes = torch.randint(0, 70_000, (count,), generator=generator).tolist()
    return [0 if i % 97 == 0 else (1 + i % 7 if i % 5 == 0 else n) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_thousands_of_tensors_over_several_launches(name, kwargs):
    # 3000 tensors do not fit one launch's metadata (about 60-100 tensors
    # each): the planner must split them and cover every element once.
    sizes = _mixed_sizes(3000)
    ours, ref = _params(sizes, "cuda"), _params(sizes, "cuda")
    # three groups, so per-tensor hyperparameters cross launch boundaries
    groups = lambda ps: [  # noqa: E731
        {"params": ps[0::3]},
        {"params": ps[1::3], "lr": 3e-3},
        {"params": ps[2::3], "weight_decay": 0.0},
    ]
    opt = getattr(fused_optim, name)(groups(ours), **kwargs)
    ref_opt = getattr(torch.optim, name)(groups(ref), foreach=False, **kwargs)
    for step in range(3):
        _set_grads(ours, step)
        _set_grads(ref, step)
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q)
            for key, value in ref_opt.state[q].items():
                torch.testing.assert_close(opt.state[p][key].to(value.device), value)


@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_tensor_of_many_chunks_beside_small_ones(name, kwargs):
    # A tensor of ~600 chunks (16K elements each), with an odd tail, between
    # tiny tensors: chunk-to-element mapping and the tail path.
    sizes = [3, 10_000_019, 1, 8, 4099]
    ours, ref = _params(sizes, "cuda"), _params(sizes, "cuda")
    opt = getattr(fused_optim, name)(ours, **kwargs)
    ref_opt = getattr(torch.optim, name)(ref, foreach=False, **kwargs)
    for step in range(3):
        _set_grads(ours, step)
        _set_grads(ref, step)
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,kwargs", OPTIMIZERS, ids=[n for n, _ in OPTIMIZERS])
def test_cuda_equals_cpu_bit_for_bit(name, kwargs, dtype):
    # Both backends run the same update rules (update_rules.h) on the same
    # host-derived scalars, with IEEE division and sqrt and no FMA contraction
    # (-ffp-contract=off on the host, --fmad=false in nvcc), so fp32 and fp64
    # results must agree exactly. Sizes hit vector bodies, tails and
    # misaligned starts (a view at offset 1).
    sizes = [1, 7, 8, 9, 4099, 65_537]
    cpu = _params(sizes, "cpu", dtype)
    cuda = _params(sizes, "cuda", dtype)
    base = torch.randn(10_001, dtype=dtype)
    cpu.append(torch.nn.Parameter(base.clone()[1:]))
    cuda.append(torch.nn.Parameter(base.clone().cuda()[1:]))
    opt_cpu = getattr(fused_optim, name)(cpu, **kwargs)
    opt_cuda = getattr(fused_optim, name)(cuda, **kwargs)
    for step in range(5):
        _set_grads(cpu, step)
        _set_grads(cuda, step)
        opt_cpu.step()
        opt_cuda.step()
    for p, q in zip(cpu, cuda):
        assert torch.equal(p, q.cpu())


def test_tensor_over_2_31_elements_is_updated_to_its_end():
    # apex, DeepSpeed and TransformerEngine shipped silent non-updates past
    # element 2^31 (32-bit offsets). bf16 param + grad: about 8.6 GB.
    n = 2**31 + 1025
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2:
        pytest.skip(f"needs {3 * n * 2 / 2**30:.1f} GiB of free GPU memory")
    p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16, device="cuda"))
    p.grad = torch.ones_like(p)
    fused_optim.SGD([p], lr=1.0).step()
    # every element moved by -lr * grad = -1, the last ones included
    for where in (slice(0, 1024), slice(2**31 - 512, 2**31 + 512), slice(n - 1024, n)):
        assert torch.equal(p.detach()[where], torch.full((1024,), -1.0, dtype=torch.bfloat16, device="cuda"))
    assert int((p.detach() != -1).sum()) == 0


def test_step_runs_on_the_current_stream():
    # Kernels launch on torch's current stream: work queued on a side stream
    # before the step is ordered before it, with no extra synchronisation.
    params = _params([1 << 20], "cuda")
    opt = fused_optim.SGD(params, lr=1.0)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        params[0].grad = torch.ones_like(params[0])
        expected = params[0].detach() - 1
        opt.step()
    side.synchronize()
    assert torch.equal(params[0].detach(), expected)
