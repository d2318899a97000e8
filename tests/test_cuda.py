"""CUDA-only checks of the multi-tensor kernels (csrc/cuda). The rest of the
suite already runs on CUDA through the DEVICES list (conftest.py); these
cover what only the CUDA launch planner can get wrong: many launches, tensors
of many chunks, CUDA against the CPU kernels, and 64-bit indexing; and what
only the CUDA path does: step counters and scalars on the device (AMP's
skipped steps, CUDA graph capture), mixed precision through the vector path.

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
    # Both backends run the same update rules (update_rules.h) on scalars
    # derived by the same functions in double (the CPU on the host, CUDA on
    # the device from its device step counters), with IEEE division and sqrt
    # and no FMA contraction (-ffp-contract=off on the host, --fmad=false in
    # nvcc), so results must agree exactly. One caveat (csrc/cuda/README.md):
    # the device's double pow (beta ** step) is CUDA's, not glibc's; it may
    # differ in the last bit of a double, which narrowing to float hides but
    # fp64 params may show as a 1-ulp difference: hence fp64's tiny rtol.
    # Sizes hit vector bodies, tails and misaligned starts (a view at
    # offset 1).
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
        if dtype == torch.float32:
            assert torch.equal(p, q.cpu())
        else:
            torch.testing.assert_close(p, q.cpu(), rtol=1e-14, atol=0)


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


# ---------------------------------------------------------------------------
# Issue 4: AMP, mixed precision, CUDA graphs
# ---------------------------------------------------------------------------


def _loss_grads(params, step, inject_inf):
    """Scaled-loss gradients through autograd, with an inf on chosen steps."""
    generator = torch.Generator().manual_seed(100 + step)
    loss = 0
    for p in params:
        x = torch.randn(p.shape, generator=generator).to(p.device, p.dtype)
        loss = loss + (p * x).sum() + (p * p).sum() * 0.5
    if inject_inf:
        loss = loss * float("inf")
    return loss


@pytest.mark.parametrize(
    "name,kwargs",
    [("Adam", dict(lr=1e-2, weight_decay=0.1)), ("AdamW", dict(lr=1e-2)),
     ("SGD", dict(lr=1e-2, momentum=0.9)), ("Adagrad", dict(lr=1e-2)),
     ("RMSprop", dict(lr=1e-2, centered=True))],
    ids=["Adam", "AdamW", "SGD", "Adagrad", "RMSprop"],
)
def test_grad_scaler_matches_torch_with_skipped_steps(name, kwargs):
    # Ours takes grad_scale/found_inf from the GradScaler
    # (_step_supports_amp_scaling): unscales in the kernel, writes the
    # unscaled grads back, and skips the step on the device when found_inf.
    # torch.optim (foreach=False) is driven by its own scaler, which unscales
    # with its own kernel and skips in Python. Params, state, step counts and
    # the scaler's scale must match; steps 2 and 5 carry an inf.
    sizes = [1, 7, 4099, 65_537]
    ours, ref = _params(sizes, "cuda"), _params(sizes, "cuda")
    opt = getattr(fused_optim, name)(ours, **kwargs)
    ref_opt = getattr(torch.optim, name)(ref, foreach=False, **kwargs)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=3)
    ref_scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12, growth_interval=3)
    for step in range(8):
        inject = step in (2, 5)
        for params, o, sc in ((ours, opt, scaler), (ref, ref_opt, ref_scaler)):
            o.zero_grad(set_to_none=True)
            sc.scale(_loss_grads(params, step, inject)).backward()
            sc.step(o)
            sc.update()
        assert scaler.get_scale() == ref_scaler.get_scale()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q)
            if not inject:
                # the unscaled grads were written back
                torch.testing.assert_close(p.grad, q.grad)
            for key, value in ref_opt.state[q].items():
                torch.testing.assert_close(
                    opt.state[p][key].to(value.device, value.dtype), value
                )
    # 8 steps, 2 skipped: the counters did not advance on the device
    for p in ours:
        if "step" in opt.state[p]:
            assert opt.state[p]["step"].device == p.device
            assert opt.state[p]["step"].item() == 6


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad", "RMSprop"])
def test_bf16_params_with_master_weights_follow_fp32_torch(name):
    # bf16 params with fp32 master weights: the update runs on the master
    # copy in fp32 (state fp32 by default), and the bf16 param is the master
    # rounded to nearest. torch.optim in fp32 on a copy of the master, fed the
    # same (bf16) gradients, must track the master.
    kwargs = {"lr": 1e-2}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    sizes = [1, 7, 8, 9, 4099, 65_537]
    ours = _params(sizes, "cuda", torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]
    opt = getattr(fused_optim, name)(ours, master_weights=True, **kwargs)
    ref_opt = getattr(torch.optim, name)(ref, foreach=False, **kwargs)
    for step in range(7):
        _set_grads(ours, step)
        for p, q in zip(ours, ref):
            q.grad = p.grad.float()
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            master = opt.state[p]["master_param"]
            assert master.dtype == torch.float32
            torch.testing.assert_close(master, q.detach())
            assert torch.equal(p.detach(), master.to(torch.bfloat16))
            for key, value in ref_opt.state[q].items():
                if key != "step":
                    assert opt.state[p][key].dtype == torch.float32


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["Adam", "SGD", "Adagrad", "RMSprop"])
def test_mixed_state_dtype_cuda_equals_cpu(name, state_dtype, param_dtype):
    # Mixed element sizes through the vector path (e.g. bf16 params with
    # fp32 state: 8-byte param loads beside 16-byte state loads), tails and
    # misaligned views; CUDA and CPU run the same rules on the same inputs.
    kwargs = {"lr": 1e-2, "state_dtype": state_dtype}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    if name == "RMSprop":
        kwargs.update(momentum=0.5, centered=True)
    sizes = [1, 7, 8, 9, 4099, 65_537]
    cpu = _params(sizes, "cpu", param_dtype)
    cuda = _params(sizes, "cuda", param_dtype)
    base = torch.randn(10_001).to(param_dtype)
    cpu.append(torch.nn.Parameter(base.clone()[3:]))
    cuda.append(torch.nn.Parameter(base.clone().cuda()[3:]))
    opt_cpu = getattr(fused_optim, name)(cpu, **kwargs)
    opt_cuda = getattr(fused_optim, name)(cuda, **kwargs)
    for step in range(5):
        _set_grads(cpu, step)
        _set_grads(cuda, step)
        opt_cpu.step()
        opt_cuda.step()
    for p, q in zip(cpu, cuda):
        assert torch.equal(p, q.cpu())
        for key, value in opt_cpu.state[p].items():
            if key == "step":
                continue
            assert opt_cuda.state[q][key].dtype == state_dtype
            assert torch.equal(value, opt_cuda.state[q][key].cpu()), key


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad", "RMSprop"])
def test_stochastic_rounding_cuda_equals_cpu(name):
    # The random bits are a pure function of (tensor position, step,
    # element) (precision.h), so both backends round identically.
    kwargs = {"lr": 1e-3}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    sizes = [1, 7, 8, 9, 4099, 65_537]
    cpu = _params(sizes, "cpu", torch.bfloat16)
    cuda = _params(sizes, "cuda", torch.bfloat16)
    opt_cpu = getattr(fused_optim, name)(cpu, stochastic_rounding=True, **kwargs)
    opt_cuda = getattr(fused_optim, name)(cuda, stochastic_rounding=True, **kwargs)
    for step in range(5):
        _set_grads(cpu, step)
        _set_grads(cuda, step)
        opt_cpu.step()
        opt_cuda.step()
        for p, q in zip(cpu, cuda):
            assert torch.equal(p, q.cpu())


def _mlp(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 10)
    ).cuda()


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad", "RMSprop"])
def test_captured_training_step_replays_like_eager_steps(name):
    # A whole training step (forward, backward, optimizer.step()) captured
    # in a CUDA graph and replayed must equal the same steps run eagerly:
    # the step counters advance on the device, the scalars are derived on the
    # device, and the lr is read from its tensor, so a scheduler-style
    # `lr.fill_()` between replays takes effect.
    kwargs = {"capturable": True, "weight_decay": 1e-2}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    graphed, eager = _mlp(0), _mlp(0)
    lr_graphed = torch.tensor(1e-3, device="cuda")
    lr_eager = torch.tensor(1e-3, device="cuda")
    opt = getattr(fused_optim, name)(graphed.parameters(), lr=lr_graphed, **kwargs)
    ref = getattr(fused_optim, name)(eager.parameters(), lr=lr_eager, **kwargs)
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(32, 64, generator=generator).cuda(),
         torch.randn(32, 10, generator=generator).cuda())
        for _ in range(12)
    ]
    static_x = torch.zeros(32, 64, device="cuda")
    static_y = torch.zeros(32, 10, device="cuda")

    def train_step(model, optimizer, x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()

    # warm up on a side stream (state and workspaces exist before capture)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            opt.zero_grad(set_to_none=True)
            train_step(graphed, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:3]:
        ref.zero_grad(set_to_none=True)
        train_step(eager, ref, x, y)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        train_step(graphed, opt, static_x, static_y)

    for i, (x, y) in enumerate(batches[3:]):
        if i == 5:  # as a scheduler does with a tensor lr
            lr_graphed.fill_(3e-4)
            lr_eager.fill_(3e-4)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        ref.zero_grad(set_to_none=False)
        for p in eager.parameters():
            p.grad.zero_()
        train_step(eager, ref, x, y)
        for p, q in zip(graphed.parameters(), eager.parameters()):
            torch.testing.assert_close(p, q)
    for p in graphed.parameters():
        if "step" in opt.state[p]:
            assert opt.state[p]["step"].device.type == "cuda"
            assert opt.state[p]["step"].item() == 12
