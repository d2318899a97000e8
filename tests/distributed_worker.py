"""The scenarios of test_distributed_2proc.py, run in 2 gloo processes on CPU (and, on
a machine with CUDA, with NCCL and CUDA params: 2 processes on 2 GPUs, one
process on one GPU).

Each scenario runs on both ranks and compares inside the processes
(full tensors, gathered); its outcome per rank ("ok" or the traceback) is
written to a JSON file that the tests read. Processes are expensive to
start, so one pair runs every scenario of a phase: phase "main" runs all
scenarios and saves checkpoints; phase "resume" runs in new processes and
resumes from them.
"""

from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

import fused_optim
from fused_optim import _ops
from optim_configs import NORM_READING, ONE_PER_OPTIMIZER, torch_class

WORLD = 2
DEVICE = "cpu"  # set by run()
# Each optimizer's feature-rich config (optim_configs.ONE_PER_OPTIMIZER),
# but for those whose update reads each tensor's norms (NORM_READING: the
# scenarios of "LARS and LAMB on shards").
OPTIMIZERS = {c.name: c.kwargs for c in ONE_PER_OPTIMIZER if c.name not in NORM_READING}
STEPS = 10
SCENARIOS: dict = {}


def scenario(phase):
    def register(fn):
        SCENARIOS.setdefault(phase, []).append(fn)
        return fn

    return register


# ----- helpers ----------------------------------------------------------------


def world_size(device: str) -> int:
    return WORLD if device == "cpu" else min(WORLD, torch.cuda.device_count())


def _model(dtype=torch.float32, seed=0):
    # 33 and 3 rows: uneven shards on 2 ranks (one rank gets 1 of 3 rows)
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 33), torch.nn.Tanh(), torch.nn.Linear(33, 3)
    ).to(DEVICE, dtype)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).to(DEVICE)


def _fsdp(model, mesh, **kwargs):
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh, **kwargs)
    return fully_shard(model, mesh=mesh, **kwargs)


def _groups(model):
    # two param groups with different hyperparameters
    return [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), "lr": 0.02, "weight_decay": 0.0},
    ]


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _train(model, opt, steps, seed, dtype=torch.float32, before_step=None, per_rank=True):
    """Steps on this rank's batches (seeded per rank and step; the same on
    every rank without ``per_rank``); ``before_step(model)`` runs between
    backward and step."""
    for i in range(steps):
        torch.manual_seed(1000 * seed + 10 * i + (dist.get_rank() if per_rank else 0))
        opt.zero_grad()
        model(_randn(8, 16, dtype=dtype)).square().mean().backward()
        if before_step is not None:
            before_step(model)
        opt.step()


def _full_state(opt):
    """{param index: {name: full tensor}} of an optimizer's state_dict."""
    return {
        k: {n: _full(v) for n, v in s.items() if isinstance(v, torch.Tensor)}
        for k, s in opt.state_dict()["state"].items()
    }


def _assert_same_run(model_a, opt_a, model_b, opt_b, **tol):
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(_full(a), _full(b), **tol)
    state_a, state_b = _full_state(opt_a), _full_state(opt_b)
    assert state_a.keys() == state_b.keys(), (state_a.keys(), state_b.keys())
    for k in state_a:
        common = state_a[k].keys() & state_b[k].keys()
        assert common, f"no common state for param {k}"
        for name in common:
            torch.testing.assert_close(
                state_a[k][name].to(state_b[k][name].dtype), state_b[k][name], **tol,
                msg=lambda m, k=k, name=name: f"state[{k}][{name!r}]: {m}",
            )


# ----- FSDP2 against torch.optim under the same FSDP2 run -----------------------


def _fsdp_against_torch(mesh, name, mp_policy=None):
    runs = []
    for cls in (torch_class(name), getattr(fused_optim, name)):
        kwargs = {} if mp_policy is None else {"mp_policy": mp_policy}
        model = _fsdp(_model(), mesh, **kwargs)
        opt = cls(_groups(model), **OPTIMIZERS[name])
        _train(model, opt, STEPS, seed=1)
        runs.append((model, opt))
    assert isinstance(next(runs[1][0].parameters()), DTensor)
    _assert_same_run(*runs[1], *runs[0])


for _name in OPTIMIZERS:

    def _against_torch(mesh, tmp, name=_name):
        _fsdp_against_torch(mesh, name)

    _against_torch.__name__ = f"fsdp2_{_name}_equals_torch"
    scenario("main")(_against_torch)


@scenario("main")
def fsdp2_adam_with_a_fused_false_group_equals_torch(mesh, tmp):
    # A fused=False group beside fused ones under FSDP2: torch's code steps
    # it on the DTensors (before the fused calls), the op the others.
    runs = []
    for cls in (torch.optim.Adam, fused_optim.Adam):
        model = _fsdp(_model(), mesh)
        groups = _groups(model)
        groups[1]["fused"] = False
        opt = cls(groups, **OPTIMIZERS["Adam"])
        _train(model, opt, STEPS, seed=2)
        runs.append((model, opt))
    _assert_same_run(*runs[1], *runs[0])


def _even_model():  # tensor parallelism needs even shards
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(DEVICE)


def _tensor_parallel(model, mesh):
    parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return model


# ----- clipping by the global norm across ranks --------------------------------
MAX_GRAD_NORM = 0.05  # below the norms of this run: every step clips


def _clipped_against_torch(mesh, wrap, name, make_model=_model, per_rank=True):
    """torch: clip_grad_norm_ over the whole (sharded) model, then the step;
    ours: max_grad_norm. Same params, state and norm on every rank."""
    torch_norms, runs = [], []
    for cls in (getattr(torch.optim, name), getattr(fused_optim, name)):
        model = wrap(make_model())
        ours = cls is not getattr(torch.optim, name)
        kwargs = dict(OPTIMIZERS[name], **({"max_grad_norm": MAX_GRAD_NORM} if ours else {}))
        opt = cls(_groups(model), **kwargs)
        our_norms = []

        def clip(m, ours=ours, opt=opt, our_norms=our_norms):
            if not ours:
                torch_norms.append(_full(torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_GRAD_NORM)))

        _train(model, opt, STEPS, seed=1, before_step=clip, per_rank=per_rank)
        if ours:
            # the last step's norm: every rank the same, torch's
            torch.testing.assert_close(opt.grad_norm, torch_norms[-1])
        runs.append((model, opt))
    assert isinstance(next(runs[1][0].parameters()), DTensor)
    _assert_same_run(*runs[1], *runs[0])


for _name in ("SGD", "AdamW"):

    def _clip_fsdp2(mesh, tmp, name=_name):
        _clipped_against_torch(mesh, lambda m: _fsdp(m, mesh), name)

    _clip_fsdp2.__name__ = f"fsdp2_{_name}_max_grad_norm_equals_torch_clip"
    scenario("main")(_clip_fsdp2)


@scenario("main")
def tensor_parallel_max_grad_norm_equals_torch_clip(mesh, tmp):
    # Shard(0), Shard(1) and Replicate parameters in one norm; the same
    # batch on both ranks, as tensor parallelism expects.
    _clipped_against_torch(mesh, lambda m: _tensor_parallel(m, mesh), "Adam", _even_model,
                           per_rank=False)


@scenario("main")
def fsdp2_clip_grad_norm_equals_torch(mesh, tmp):
    models = [_fsdp(_model(), mesh) for _ in range(2)]
    for model in models:
        torch.manual_seed(7 + dist.get_rank())
        model(_randn(8, 16)).square().mean().backward()
    got = fused_optim.clip_grad_norm_(models[0].parameters(), MAX_GRAD_NORM)
    want = torch.nn.utils.clip_grad_norm_(models[1].parameters(), MAX_GRAD_NORM)
    # (torch's norm of DTensor gradients is a DTensor on their mesh, which
    # callers read with full_tensor(); ours too)
    assert isinstance(want, DTensor) and isinstance(got, DTensor)
    assert (got.device_mesh, got.placements) == (want.device_mesh, want.placements)
    torch.testing.assert_close(_full(got), _full(want))
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(_full(a.grad), _full(b.grad))
    # The two halves: get_total_norm's DTensor, and clip_grads_with_norm_
    # given torch's DTensor norm (a factor of its full value).
    got = fused_optim.get_total_norm([p.grad for p in models[0].parameters()])
    want = torch.nn.utils.get_total_norm([p.grad for p in models[1].parameters()])
    assert isinstance(got, DTensor) and got.placements == want.placements
    torch.testing.assert_close(_full(got), _full(want))
    fused_optim.clip_grads_with_norm_(models[0].parameters(), MAX_GRAD_NORM / 2, want)
    torch.nn.utils.clip_grads_with_norm_(models[1].parameters(), MAX_GRAD_NORM / 2, want)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(_full(a.grad), _full(b.grad))
    assert _full(fused_optim.get_total_norm([p.grad for p in models[0].parameters()])) < MAX_GRAD_NORM
    # Traced (a compiled train step): the public op's DTensor handler, the
    # eager bits.
    models = [_fsdp(_model(), mesh) for _ in range(2)]
    for model in models:
        torch.manual_seed(9 + dist.get_rank())
        model(_randn(8, 16)).square().mean().backward()
    compiled = torch.compile(lambda ps: fused_optim.clip_grad_norm_(ps, MAX_GRAD_NORM),
                             backend="aot_eager")
    got = compiled(list(models[0].parameters()))
    want = fused_optim.clip_grad_norm_(models[1].parameters(), MAX_GRAD_NORM)
    assert isinstance(got, DTensor) and torch.equal(_full(got), _full(want))
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(_full(a.grad), _full(b.grad))


# ----- LARS and LAMB on shards: each tensor's norms across ranks ---------------
# (Note [norms across shards] in csrc/op_front.h.) The sharded run against
# the same optimizer on the whole model, on the same batch on both ranks
# (so the FSDP2 mean gradient is the plain one): a norm taken per shard
# would differ from the first step. Group 0 is adapted (weight decay);
# Lamb clips at its default max_grad_norm=1.0, a norm across ranks too
# (NORM_READING: their options).


def _sharded_against_whole(name, make_model, shard, dtype=torch.float32, compiled=False,
                           **extra):
    """The sharded model's run against the whole model's (eager); with
    ``compiled``, the sharded run's step under torch.compile."""
    runs = []
    for sharded in (False, True):
        model = make_model()
        if sharded:
            model = shard(model)
        opt = getattr(fused_optim, name)(_groups(model), **{**NORM_READING.get(name, {}), **extra})
        if sharded and compiled:
            opt.step = torch.compile(opt.step, backend="aot_eager")
        _train(model, opt, STEPS, seed=3, dtype=dtype, per_rank=False)
        runs.append((model, opt))
    assert any(isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)
               for p in runs[1][0].parameters())
    _assert_same_run(*runs[1], *runs[0], rtol=1e-5, atol=1e-6)


for _name in NORM_READING:

    def _fsdp2_norms(mesh, tmp, name=_name):
        _sharded_against_whole(name, _model, lambda m: _fsdp(m, mesh))

    def _tp_norms(mesh, tmp, name=_name):
        # Shard(0) (colwise weight and bias), Shard(1) (rowwise weight) and
        # Replicate (rowwise bias) in one call.
        _sharded_against_whole(name, _even_model, lambda m: _tensor_parallel(m, mesh))

    def _fsdp2_norms_compiled(mesh, tmp, name=_name):
        # The traced step: the measure-then-update of the shards and (LAMB's
        # max_grad_norm) the global norm, sum_of_squares on DTensor
        # gradients, inside the compiled graph.
        _sharded_against_whole(name, _model, lambda m: _fsdp(m, mesh), compiled=True)

    _fsdp2_norms.__name__ = f"fsdp2_{_name}_equals_whole_model"
    _tp_norms.__name__ = f"tensor_parallel_{_name}_equals_whole_model"
    _fsdp2_norms_compiled.__name__ = f"fsdp2_{_name}_compiled_equals_whole_model"
    scenario("main")(_fsdp2_norms)
    scenario("main")(_tp_norms)
    scenario("main")(_fsdp2_norms_compiled)


for _name in ("Lion", "Lamb"):

    def _fsdp2_cautious(mesh, tmp, name=_name):
        # timm's caution=True (the plain per-tensor step, Note [cautious
        # groups]) on DTensor shards: the mask's mean and LAMB's norms are
        # of the whole tensors (torch ops on DTensors), and Lamb's clipping
        # takes the fused step's global norm across ranks.
        _sharded_against_whole(name, _model, lambda m: _fsdp(m, mesh), caution=True,
                               **({} if name in NORM_READING else OPTIMIZERS[name]))

    _fsdp2_cautious.__name__ = f"fsdp2_cautious_{_name}_equals_whole_model"
    scenario("main")(_fsdp2_cautious)


@scenario("main")
def fsdp2_clipped_adamw_compiled_equals_whole_model(mesh, tmp):
    # A pointwise update under torch.compile on FSDP2 shards, with the
    # clipping norm (sum_of_squares on DTensor gradients) across ranks.
    _sharded_against_whole("AdamW", _model, lambda m: _fsdp(m, mesh), compiled=True,
                           lr=0.01, weight_decay=0.1, max_grad_norm=0.5)


@scenario("main")
def tensor_parallel_lamb_compiled_equals_whole_model(mesh, tmp):
    _sharded_against_whole("Lamb", _even_model, lambda m: _tensor_parallel(m, mesh),
                           compiled=True)


@scenario("main")
def fsdp2_lamb_master_weights_equals_whole_model(mesh, tmp):
    # bf16 params with float32 master weights: the norms are of the
    # masters (DTensors sharded like their params).
    _sharded_against_whole(
        "Lamb", lambda: _model(torch.bfloat16), lambda m: _fsdp(m, mesh),
        dtype=torch.bfloat16, master_weights=True)


def _lamb_measure(params, grads, exp_avgs, exp_avg_sqs):
    """lamb_.measure on these lists (one group, decoupled decay)."""
    signature = _ops.SIGNATURES["lamb_"]
    values = signature.arguments(
        params=params, grads=grads, states={"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
        master_params=[], steps=[torch.tensor(2.0, device=DEVICE) for _ in params],
        group_index=[0] * len(params), lr=[0.01],
        hyper={"beta1": [0.9], "beta2": [0.99], "eps": [1e-6], "weight_decay": [0.01],
               "bias_correction": [1.0], "grad_averaging": [1.0], "trust_clip": [0.0],
               "always_adapt": [0.0], "max_lr": [0.0]},
        group_flags={"maximize": [False], "decoupled_weight_decay": [True]},
        new_state=None, grad_scale=None, found_inf=None, modes={}, stochastic_rounding=False)
    return torch.ops.fused_optim.lamb_.measure(
        *values[:signature.num_positional],
        **dict(zip(signature.keywords, values[signature.num_positional:])))


@scenario("main")
def measure_on_dtensors_is_the_whole_tensors_sums(mesh, tmp):
    # lamb_.measure on sharded DTensors: the sums of the whole tensors, on
    # a 1-D mesh and on the 2-D meshes of HSDP (Replicate(), Shard(0)),
    # where only the sharded dimension is summed over: across both ranks
    # (mesh (1, 2)) or over one (mesh (2, 1): each rank holds whole
    # tensors, and summing over the replicating dimension would double the
    # sums; trust ratios, quotients of two norms, would not show it).
    torch.manual_seed(11)
    full = [_randn(7, 3), _randn(5)]
    lists = [[t.clone() for t in full], [torch.randn_like(t) for t in full],
             [torch.randn_like(t) for t in full], [torch.rand_like(t) for t in full]]
    want = _lamb_measure(*lists)
    world = mesh.size()
    layouts = [(mesh, [Shard(0)])] + [
        (init_device_mesh(DEVICE, shape, mesh_dim_names=("replicate", "shard")),
         [Replicate(), Shard(0)])
        for shape in ((1, world), (world, 1))]
    for on, placements in layouts:
        sharded = [[distribute_tensor(t, on, placements) for t in lst] for lst in lists]
        got = _lamb_measure(*sharded)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0,
                                   msg=lambda m, on=on: f"mesh {on}: {m}")
    # and HSDP training, sharded over both ranks
    hsdp = layouts[1][0]
    _sharded_against_whole("Lamb", _model, lambda m: _fsdp(m, hsdp))


@scenario("main")
def fsdp2_mixed_precision_policy_equals_torch(mesh, tmp):
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    _fsdp_against_torch(mesh, "AdamW", mp_policy=policy)


def _synthetic_grads(params, step, mesh=None):
    """The same full gradient on every rank, sharded like each param."""
    for i, p in enumerate(params):
        torch.manual_seed(100 * step + i)
        full = torch.randn(p.shape, dtype=torch.float32).to(p.device, p.dtype)
        p.grad = distribute_tensor(full, p.device_mesh, p.placements) if isinstance(p, DTensor) else full


@scenario("main")
def fsdp2_master_weights_and_bf16_state_equal_unsharded(mesh, tmp):
    # The sharded step is the unsharded step on each shard: bf16 params with
    # fp32 master weights and bf16 state, fed the same full gradients.
    for options in (dict(master_weights=True), dict(state_dtype=torch.bfloat16),
                    dict(master_weights=True, state_dtype=torch.bfloat16)):
        sharded = _fsdp(_model(torch.bfloat16), mesh)
        plain = _model(torch.bfloat16)
        opts = [fused_optim.AdamW(_groups(m), lr=0.01, **options) for m in (sharded, plain)]
        for step in range(STEPS):
            for m, opt in zip((sharded, plain), opts):
                _synthetic_grads(list(m.parameters()), step)
                opt.step()
        _assert_same_run(sharded, opts[0], plain, opts[1], atol=0, rtol=0)
        if options.get("master_weights"):
            master = next(iter(opts[0].state.values()))["master_param"]
            assert isinstance(master, DTensor) and master.dtype == torch.float32


@scenario("main")
def stochastic_rounding_draws_each_shards_own_bits(mesh, tmp):
    # Note [rounding ids of shards] (fused_optim/_dtensor.py): a bf16 weight
    # whose two halves are equal, as are their gradients, so the two ranks'
    # shards and updates are equal; the updates are below half a bf16 ulp,
    # so only stochastic rounding moves the weight. Sharded, the shards
    # must round differently, the first as the whole tensor's first half;
    # replicated, every rank rounds as the whole tensor.
    # (values in [0.5, 1), where a bf16 ulp is 2^-8: an update of lr=1e-3
    # rounds up with probability about 1/4, independently per shard)
    gen = torch.Generator().manual_seed(7)
    half = torch.rand(4, 64, generator=gen) * 0.5 + 0.5
    grads = [torch.randn(4, 64, generator=gen) for _ in range(3)]

    def trained(placements):
        def placed(t):
            t = torch.cat([t, t]).to(DEVICE, torch.bfloat16)
            return t if placements is None else distribute_tensor(t, mesh, placements)

        param = torch.nn.Parameter(placed(half))
        opt = fused_optim.AdamW([param], lr=1e-3, weight_decay=0.0, stochastic_rounding=True)
        for grad in grads:
            param.grad = placed(grad)
            opt.step()
        return _full(param.detach())

    whole, sharded, replicated = trained(None), trained([Shard(0)]), trained([Replicate()])
    start = torch.cat([half, half]).to(DEVICE, torch.bfloat16)
    assert not torch.equal(whole, start)  # (the rounding moved it)
    assert torch.equal(sharded[:4], whole[:4])
    differ = (sharded[:4] != sharded[4:]).float().mean().item()
    # (alike in every element with the same bits; here about 60% differ)
    assert differ > 0.3, f"the shards rounded alike in {1 - differ:.0%} of their elements"
    assert torch.equal(replicated, whole)


def _adam_public_op(tensor_lr, params, grads, exp_avgs, exp_avg_sqs, steps):
    """torch.ops.fused_optim.adam_ (.default or .tensor_lr) over two groups
    that differ in maximize and decoupled_weight_decay, built by name."""
    signature = _ops.SIGNATURES["adam_"]
    lr = [1e-2, 3e-3]
    values = signature.arguments(
        params=params, grads=grads, states={"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs},
        master_params=[], steps=steps, group_index=[0, 1],
        lr=[torch.tensor(v, device=DEVICE) for v in lr] if tensor_lr else lr,
        hyper={"beta1": [0.9, 0.8], "beta2": [0.999, 0.99], "eps": [1e-8, 1e-6],
               "weight_decay": [0.1, 0.05]},
        group_flags={"maximize": [False, True], "decoupled_weight_decay": [True, False]},
        new_state=None, grad_scale=None, found_inf=None, modes={"amsgrad": False},
        stochastic_rounding=False)
    op = torch.ops.fused_optim.adam_.tensor_lr if tensor_lr else torch.ops.fused_optim.adam_.default
    op(*values[:signature.num_positional],
       **dict(zip(signature.keywords, values[signature.num_positional:])))


@scenario("main")
def public_op_on_dtensors(mesh, tmp):
    # torch.ops.fused_optim.* itself takes DTensors, in both overloads (the
    # lr tensors plain): the same as the op on the full tensors; mismatched
    # placements are refused before writing.
    for tensor_lr in (False, True):
        torch.manual_seed(5)
        full = [_randn(7, 3), _randn(5)]
        lists = [[t.clone() for t in full]] + [[torch.randn_like(t) for t in full]] + [
            [torch.zeros_like(t) for t in full] for _ in range(2)
        ]
        sharded = [[distribute_tensor(t, mesh, [Shard(0)]) for t in lst] for lst in lists]
        steps = [[torch.tensor(0.0, device=DEVICE) for _ in full] for _ in range(2)]
        for lst, step in ((lists, steps[0]), (sharded, steps[1])):
            _adam_public_op(tensor_lr, *lst, step)
        for a, b in zip(lists, sharded):
            for x, y in zip(a, b):
                assert torch.equal(x, y.full_tensor()), f"tensor_lr={tensor_lr}"
        assert all(s.item() == 1.0 for s in steps[1])
        bad = [distribute_tensor(t, mesh, [Replicate()]) for t in lists[1]]
        before = [t.full_tensor().clone() for t in sharded[0]]
        try:
            _adam_public_op(tensor_lr, sharded[0], bad, *sharded[2:], steps[1])
        except RuntimeError as error:
            assert "placements" in str(error), error
        else:
            raise AssertionError(f"mismatched placements were accepted (tensor_lr={tensor_lr})")
        assert all(torch.equal(a, b.full_tensor()) for a, b in zip(before, sharded[0]))


@scenario("main")
def tensor_parallel_equals_torch(mesh, tmp):
    runs = []
    for cls in (torch.optim.Adam, fused_optim.Adam):
        model = _tensor_parallel(_even_model(), mesh)
        opt = cls(_groups(model), lr=0.01, weight_decay=0.01)
        # the same batch on both ranks, as tensor parallelism expects
        for i in range(STEPS):
            torch.manual_seed(10 * i)
            opt.zero_grad()
            model(_randn(8, 16)).square().mean().backward()
            opt.step()
        runs.append((model, opt))
    assert isinstance(next(runs[1][0].parameters()), DTensor)
    _assert_same_run(*runs[1], *runs[0])


@scenario("main")
def ddp_zero_redundancy_equals_torch(mesh, tmp):
    # ZeroRedundancyOptimizer shards the params across the 2 ranks, each
    # stepping its shard with optimizer_class; its state dict is
    # consolidated on rank 0 and loaded back.
    from torch.distributed.optim import ZeroRedundancyOptimizer

    for name in ("SGD", "Adam"):
        runs = []
        for cls in (torch_class(name), getattr(fused_optim, name)):
            model = DistributedDataParallel(_model())
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls,
                                          **OPTIMIZERS[name])
            _train(model, opt, 5, seed=6)
            opt.consolidate_state_dict(to=0)
            state = opt.state_dict() if dist.get_rank() == 0 else None
            objects = [state]
            dist.broadcast_object_list(objects, src=0)
            opt.load_state_dict(objects[0])
            _train(model, opt, 5, seed=7)
            runs.append(model)
        for a, b in zip(runs[1].parameters(), runs[0].parameters()):
            torch.testing.assert_close(a, b)


# ----- distributed checkpoints ----------------------------------------------------


def _wrap(kind, model, mesh):
    return _fsdp(model, mesh) if kind == "fsdp2" else DistributedDataParallel(model)


def _inner(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def _dcp_save(model, opt, path):
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def _dcp_load(model, opt, path):
    # what a user writes: templates from the model and the optimizer, the
    # default planner (no allow_partial_load)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


@scenario("main")
def dcp_both_ways_with_torch(mesh, tmp):
    # torch.optim saves, we resume (and the reverse); the resumed run must
    # end where the saver's uninterrupted run ends.
    for kind in ("ddp", "fsdp2"):
        for name in ("Adam", "SGD", "Adagrad"):
            for saver, loader in (("torch", "fused"), ("fused", "torch")):
                classes = {"torch": torch_class(name), "fused": getattr(fused_optim, name)}
                path = os.path.join(tmp, f"{kind}-{name}-{saver}")
                model = _wrap(kind, _model(), mesh)
                opt = classes[saver](_groups(_inner(model)), **OPTIMIZERS[name])
                _train(model, opt, 4, seed=2)
                _dcp_save(model, opt, path)
                _train(model, opt, 4, seed=3)
                resumed = _wrap(kind, _model(seed=99), mesh)  # other weights
                restart = classes[loader](_groups(_inner(resumed)), **OPTIMIZERS[name])
                _dcp_load(resumed, restart, path)
                _train(resumed, restart, 4, seed=3)
                _assert_same_run(_inner(resumed), restart, _inner(model), opt)


@scenario("main")
def dcp_torch_checkpoint_into_master_weights(mesh, tmp):
    # The documented route for a torch.optim checkpoint into an optimizer
    # with master weights (whose template asks for master_param): load the
    # model first, then the optimizer with allow_partial_load; the master
    # copy is the loaded params, the moments are the checkpoint's.
    from torch.distributed.checkpoint import DefaultLoadPlanner

    path = os.path.join(tmp, "torch-bf16-adamw")
    model = _fsdp(_model(torch.bfloat16), mesh)
    opt = torch.optim.AdamW(_groups(model), lr=0.01)
    _train(model, opt, 3, seed=8, dtype=torch.bfloat16)
    _dcp_save(model, opt, path)
    saved = _full_state(opt)

    resumed = _fsdp(_model(torch.bfloat16, seed=99), mesh)
    state = {"model": get_model_state_dict(resumed)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(resumed, state["model"])
    ours = fused_optim.AdamW(_groups(resumed), lr=0.01, master_weights=True)
    state = {"optim": get_optimizer_state_dict(resumed, ours)}
    dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(resumed, ours, state["optim"])
    for (k, st), p in zip(sorted(_full_state(ours).items()), resumed.parameters()):
        assert torch.equal(st["master_param"], _full(p).float()), k
        assert st["exp_avg"].dtype == torch.float32  # master weights keep fp32 moments
        assert torch.equal(st["exp_avg"], saved[k]["exp_avg"].float())
        assert torch.equal(st["step"], saved[k]["step"])
    _train(resumed, ours, 2, seed=9, dtype=torch.bfloat16)


# key -> (class, options of ours, whether the optimizer is saved flattened:
# StateDictOptions(flatten_optimizer_state_dict=True), as torchtitan saves it)
_RESUME_OPTIONS = {
    "plain": ("Adam", {}, False),
    "master_bf16_state": ("AdamW", dict(master_weights=True, state_dtype=torch.bfloat16), False),
    "sgd": ("SGD", {}, False),
    "flat_bf16_state_rounding": ("AdamW", dict(state_dtype=torch.bfloat16,
                                               stochastic_rounding=True), True),
    "flat_adagrad_master": ("Adagrad", dict(master_weights=True), True),
}


def _resume_model(options, mesh):
    dtype = torch.bfloat16 if options else torch.float32
    return _fsdp(_model(dtype), mesh), dtype


@scenario("main")
def dcp_resume_save(mesh, tmp):
    # Saves model and optimizer after 5 steps, goes on for 5 more; the
    # "resume" phase loads in new processes and must end where this ends.
    for key, (name, options, flatten) in _RESUME_OPTIONS.items():
        model, dtype = _resume_model(options, mesh)
        opt = getattr(fused_optim, name)(_groups(model), **OPTIMIZERS[name], **options)
        _train(model, opt, 5, seed=4, dtype=dtype)
        flat = StateDictOptions(flatten_optimizer_state_dict=flatten)
        dcp.save({"model": model.state_dict(),
                  "optim": get_optimizer_state_dict(model, opt, options=flat)},
                 checkpoint_id=os.path.join(tmp, f"resume-{key}"))
        _train(model, opt, 5, seed=5, dtype=dtype)
        final = {"params": [_full(p) for p in model.parameters()], "state": _full_state(opt)}
        if dist.get_rank() == 0:
            torch.save(final, os.path.join(tmp, f"resume-{key}-final.pt"))


@scenario("resume")
def dcp_resume_equals_uninterrupted(mesh, tmp):
    for key, (name, options, flatten) in _RESUME_OPTIONS.items():
        model, dtype = _resume_model(options, mesh)
        opt = getattr(fused_optim, name)(_groups(model), **OPTIMIZERS[name], **options)
        flat = StateDictOptions(flatten_optimizer_state_dict=flatten)
        state = {"model": model.state_dict(),
                 "optim": get_optimizer_state_dict(model, opt, options=flat)}
        dcp.load(state, checkpoint_id=os.path.join(tmp, f"resume-{key}"))
        model.load_state_dict(state["model"])
        set_optimizer_state_dict(model, opt, state["optim"], options=flat)
        _train(model, opt, 5, seed=5, dtype=dtype)
        final = torch.load(os.path.join(tmp, f"resume-{key}-final.pt"), map_location=DEVICE)
        for p, q in zip(model.parameters(), final["params"]):
            assert torch.equal(_full(p), q), f"{key}: params differ from the uninterrupted run"
        state = _full_state(opt)
        assert state.keys() == final["state"].keys()
        for k in state:
            assert state[k].keys() == final["state"][k].keys(), (key, state[k].keys())
            for n in state[k]:
                assert torch.equal(state[k][n], final["state"][k][n]), f"{key}: state[{k}][{n}]"


# ----- the process entry ----------------------------------------------------------


def run(rank, phase, port, tmp, device="cpu"):
    global DEVICE
    DEVICE = device
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = world_size(device)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("gloo" if device == "cpu" else "nccl", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    mesh = init_device_mesh(device, (world,))
    outcomes = {}
    for fn in SCENARIOS[phase]:
        try:
            fn(mesh, tmp)
            outcomes[fn.__name__] = "ok"
        except Exception:
            outcomes[fn.__name__] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(tmp, f"outcomes-{device}-{phase}-{rank}.json"), "w") as f:
        json.dump(outcomes, f)
    dist.destroy_process_group()
