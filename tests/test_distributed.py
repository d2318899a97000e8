"""The distributed wrappers users put around an optimizer: DDP, and
ZeroRedundancyOptimizer(optimizer_class=fused_optim.X), on a one-process
gloo group (the mechanics are the same; CI has no GPUs or peers)."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.optim.utils import functional_optim_map
from torch.nn.parallel import DistributedDataParallel

import fused_optim
from fused_optim import _ops
from optim_configs import (DENSE_STATE_OPTIONS, NORM_READING, ONE_PER_OPTIMIZER, OPTIMIZER_NAMES,
                           torch_class)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def process_group():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(_free_port())
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _train(model, opt, steps=5):
    torch.manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_zero_redundancy_and_ddp_match_torch(process_group, name):
    kwargs = {"lr": 1e-2, **DENSE_STATE_OPTIONS[name]}
    results = []
    for optimizer_class in (torch_class(name), getattr(fused_optim, name)):
        model = DistributedDataParallel(_model(0))
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class, **kwargs)
        results.append(_train(model, opt))
        # ZeRO consolidates and re-loads the wrapped optimizer's state dict.
        opt.consolidate_state_dict(to=0)
        state = opt.state_dict()
        opt.load_state_dict(state)
        results[-1] += _train(model, opt, steps=2)
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref)


def _run_after_each_import_order(module: str, check: str) -> None:
    """Runs ``check`` (Python source that prints "registered") in a fresh
    interpreter after importing ``module`` and fused_optim in each order;
    fused_optim alone must not import ``module`` (it costs up to a second)."""
    alone = f"import sys, fused_optim; assert {module!r} not in sys.modules"
    for first in (f"{alone}; import {module}", f"import {module}; import fused_optim"):
        out = subprocess.run([sys.executable, "-c", f"{first}; {check}"], capture_output=True,
                             text=True, timeout=120)
        assert out.stdout.strip() == "registered", (first, out.stderr)


def test_dtensor_rule_registered_whichever_is_imported_first():
    # torch.distributed.tensor is imported lazily (it costs ~0.5 s): the
    # rule is registered when it is, before or after fused_optim.
    # Both overloads of every op (float lr, tensor lr).
    check = (
        "from torch.distributed.tensor import DTensor; "
        "handlers = DTensor._op_dispatcher._custom_op_handlers; "
        "import torch; "
        "assert all(getattr(getattr(torch.ops.fused_optim, n), overload) in handlers "
        "for n in ('adam_', 'sgd_', 'adagrad_', 'rmsprop_', 'radam_', 'nadam_', 'lion_', 'lars_', "
        "'lamb_') "
        "for overload in ('default', 'tensor_lr')); print('registered')"
    )
    _run_after_each_import_order("torch.distributed.tensor", check)


# Ours whose torch.optim class has a functional twin in torch.distributed
# (_functional.py registers them; torch has none for RAdam, NAdam, nor for
# Lion, Lars, Lamb, which it lacks): read from torch's map, so that a new
# optimizer is covered where torch has its twin.
FUNCTIONAL_TWINS = [n for n in fused_optim.__all__ if getattr(torch.optim, n, None)
                    in functional_optim_map]


def test_functional_twins_registered_whichever_is_imported_first():
    check = (
        "import torch, fused_optim; "
        "from torch.distributed.optim.utils import functional_optim_map as twins; "
        f"assert all(twins[getattr(fused_optim, n)] is twins[getattr(torch.optim, n)] "
        f"for n in {FUNCTIONAL_TWINS!r}); "
        "assert not any(getattr(fused_optim, n) in twins "
        "for n in ('RAdam', 'NAdam', 'Lion', 'Lars', 'Lamb')); print('registered')"
    )
    _run_after_each_import_order("torch.distributed.optim.utils", check)


# Options that reach every branch of each functional twin's update. DDP's
# overlapped optimizer steps one param at a time (the twin's step_param),
# which torch's twins of Adagrad and RMSprop lack (ZeRO's overlap_with_ddp
# steps a bucket, step(gradients), which all five have).
OVERLAPPED = {
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "Adam": dict(lr=0.01, weight_decay=0.01, amsgrad=True),
    "AdamW": dict(lr=0.01, weight_decay=0.1, maximize=True),
}


def _overlapped_ddp_run(optimizer_class, **kwargs):
    """Params after DDP's overlapped optimizer (each param stepped in the
    communication hook, right after its gradient is reduced) of
    ``optimizer_class`` trained 4 steps."""
    model = DistributedDataParallel(_model(0))
    model._register_fused_optim(optimizer_class, **kwargs)
    torch.manual_seed(1)
    for _ in range(4):
        model(torch.randn(8, 16)).square().mean().backward()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.filterwarnings("ignore:`TorchScript` support for functional optimizers")
@pytest.mark.parametrize("name", sorted(OVERLAPPED))
def test_ddp_overlapped_optimizer_takes_ours_as_torchs(process_group, name):
    before = [p.detach().clone() for p in _model(0).parameters()]
    ref = _overlapped_ddp_run(getattr(torch.optim, name), **OVERLAPPED[name])
    ours = _overlapped_ddp_run(getattr(fused_optim, name), **OVERLAPPED[name])
    assert not any(torch.equal(p, q) for p, q in zip(ref, before))  # (it stepped)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)


@pytest.mark.filterwarnings("ignore:`TorchScript` support for functional optimizers")
@pytest.mark.parametrize("name", sorted(set(FUNCTIONAL_TWINS) - set(OVERLAPPED)))
def test_ddp_overlapped_optimizer_refuses_ours_as_torchs(process_group, name):
    for cls in (getattr(torch.optim, name), getattr(fused_optim, name)):
        with pytest.raises(ValueError, match="must implement method step_param"):
            DistributedDataParallel(_model(0))._register_fused_optim(cls, lr=0.1)


@pytest.mark.filterwarnings("ignore:`TorchScript` support for functional optimizers")
@pytest.mark.parametrize("name", FUNCTIONAL_TWINS)
def test_functional_twins_refuse_our_precision_keywords(name):
    # The twin takes torch's keywords only, as it does for torch's class.
    from torch.distributed.optim import as_functional_optim

    for keyword, value in (("master_weights", True), ("state_dtype", torch.bfloat16),
                           ("stochastic_rounding", True), ("max_grad_norm", 1.0)):
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{keyword}'"):
            as_functional_optim(getattr(fused_optim, name), lr=0.1, **{keyword: value})


def test_classes_without_a_functional_twin_are_refused_as_torchs():
    from torch.distributed.optim import as_functional_optim

    for cls in (torch.optim.RAdam, fused_optim.RAdam, fused_optim.NAdam, fused_optim.Lion):
        with pytest.raises(ValueError, match="does not have a functional counterpart"):
            as_functional_optim(cls, lr=0.1)


def test_norm_reading_names_every_optimizer_whose_op_reads_norms():
    reads_norms = {n for n in OPTIMIZER_NAMES
                   if getattr(fused_optim, n)._op_name in _ops.TENSOR_NORM_OPS}
    assert set(NORM_READING) == reads_norms


@pytest.mark.parametrize("name", sorted(NORM_READING))
def test_norm_reading_optimizers_on_dtensors_equal_the_plain_step(process_group, name):
    # LARS and LAMB read each param's norm and that of its gradient or
    # update (Note [per-tensor norms]): a replicated DTensor is the whole
    # tensor; a sharded one is measured per shard and its sums all-reduced
    # over the mesh (Note [norms across shards]; with one rank the sum is
    # the shard's own, and the step is bit for bit the plain one).
    # distributed_worker.py runs the same on two ranks.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    full, grad = torch.randn(8, 4), torch.randn(8, 4)
    cls, kwargs = getattr(fused_optim, name), NORM_READING[name]
    ref = torch.nn.Parameter(full.clone())
    ref.grad = grad.clone()
    cls([ref], **kwargs).step()
    for placement in (Replicate(), Shard(0), Shard(1)):
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [placement]))
        p.grad = distribute_tensor(grad.clone(), mesh, [placement])
        cls([p], **kwargs).step()
        torch.testing.assert_close(p.full_tensor(), ref.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("name,extra", [("Lars", {}), ("Lamb", {}),
                                        ("Adam", {"lr": 0.01, "max_grad_norm": 0.5})],
                         ids=["Lars", "Lamb", "Adam-max_grad_norm"])
def test_compiled_steps_on_dtensors_equal_the_plain_step(process_group, name, extra):
    # torch.compile traces the step into the graph: the norm ops' measure
    # and update, and clipping's sum_of_squares, dispatched on DTensors by
    # _dtensor.py's handlers, give the plain eager step's bits.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    full, grad = torch.randn(8, 4), torch.randn(8, 4)
    cls, kwargs = getattr(fused_optim, name), {**NORM_READING.get(name, {}), **extra}
    ref = torch.nn.Parameter(full.clone())
    ref_opt = cls([ref], **kwargs)
    for placement in (Replicate(), Shard(0), Shard(1)):
        p = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [placement]))
        opt = cls([p], **kwargs)
        step = torch.compile(opt.step, backend="aot_eager")
        for i in range(3):
            p.grad = distribute_tensor(grad * (i + 1), mesh, [placement])
            step()
            if placement == Replicate():
                ref.grad = grad * (i + 1)
                ref_opt.step()
        torch.testing.assert_close(p.full_tensor(), ref.detach(), rtol=0, atol=0)


def test_sum_of_squares_of_dtensors_is_the_whole_tensors(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    wholes = [torch.randn(8, 4), torch.randn(6), torch.randn(3, 5)]
    mixed = [distribute_tensor(wholes[0], mesh, [Shard(1)]),
             distribute_tensor(wholes[1], mesh, [Replicate()]), wholes[2]]
    # (layouts that change back and forth, a Partial gradient among them:
    # each tensor counted once, in its layout's sum)
    interleaved = mixed + [distribute_tensor(wholes[0] * 2, mesh, [Shard(1)]),
                           DTensor.from_local(wholes[1] * 3, mesh, [Partial()]),
                           distribute_tensor(wholes[2] * 5, mesh, [Replicate()])]
    scale = torch.tensor([4.0])
    op = torch.ops.fused_optim.sum_of_squares.default
    for grad_scale in (None, scale, distribute_tensor(scale, mesh, [Replicate()])):
        plain_scale = None if grad_scale is None else scale
        for per_tensor in (False, True):
            got = op(mixed, grad_scale, per_tensor)
            want = op(wholes, plain_scale, per_tensor)
            assert type(got) is torch.Tensor
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
            got = op(interleaved, grad_scale, per_tensor)
            want = op(wholes + [wholes[0] * 2, wholes[1] * 3, wholes[2] * 5], plain_scale, per_tensor)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="grad_scale is a DTensor with placements .*must be plain tensors or replicated"):
        op(mixed, distribute_tensor(torch.tensor([4.0, 4.0]), mesh, [Shard(0)]), False)


def _sharded_and_plain_adam(mesh):
    """A DTensor param (Shard(0) on ``mesh``; a plain one for None) and a
    plain one in one Adam, one step taken (their state made), gradients
    set for the next; the same values whatever ``mesh``."""
    from torch.distributed.tensor import Shard, distribute_tensor

    def shard(t):
        return t if mesh is None else distribute_tensor(t, mesh, [Shard(0)])

    torch.manual_seed(0)
    sharded = torch.nn.Parameter(shard(torch.randn(8, 4)))
    plain = torch.nn.Parameter(torch.randn(6))
    opt = fused_optim.Adam([sharded, plain], lr=0.1)
    for step in range(2):
        sharded.grad = shard(torch.randn(8, 4))
        plain.grad = torch.randn(6)
        if step == 0:
            opt.step()
    return sharded, plain, opt


def _full_copies(opt) -> list:
    from torch.distributed.tensor import DTensor

    tensors = [p for g in opt.param_groups for p in g["params"]] + [
        t for state in opt.state.values() for t in state.values()]
    return [(t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for t in tensors]


def _sharding(mesh):
    """A tensor made a DTensor sharded on dim 0 of ``mesh``; None: as it is."""
    from torch.distributed.tensor import Shard, distribute_tensor

    if mesh is None:
        return lambda t: t
    return lambda t: distribute_tensor(t, mesh, [Shard(0)])


def _record_fast_entry_calls(monkeypatch, op_name: str) -> list:
    """A list to which each call of ``fused_optim._C.<op_name>`` (the op's
    fast entry) adds the set of its params' types."""
    calls = []
    real_entry = getattr(fused_optim._C, op_name)
    monkeypatch.setattr(fused_optim._C, op_name,
                        lambda *a: calls.append({type(t) for t in a[0]}) or real_entry(*a))
    return calls


@pytest.mark.parametrize("case", ["placements", "shape", "plain_state_of_dtensor",
                                  "dtensor_state_of_plain"])
def test_dtensor_step_with_a_mismatched_state_tensor_raises_and_writes_nothing(process_group, case):
    # The DTensor handler (_dtensor.py) checks every list against the
    # params before the update: a state tensor replaced by one of another
    # layout is refused, and nothing is written.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    sharded, plain, opt = _sharded_and_plain_adam(mesh)
    replacement, message = {
        "placements": (distribute_tensor(torch.zeros(8, 4), mesh, [Shard(1)]),
                       r"exp_avgs\[0\] has mesh .* and placements \(Shard\(dim=1\),\), but params\[0\] "
                       r"has .*needs them equal"),
        "shape": (distribute_tensor(torch.zeros(4, 8), mesh, [Shard(0)]),
                  r"exp_avgs\[0\] has shape \(4, 8\) but params\[0\] has shape \(8, 4\)"),
        "plain_state_of_dtensor": (torch.zeros(8, 4),
                                   r"params\[0\] is a DTensor but exp_avgs\[0\] is a plain tensor"),
        "dtensor_state_of_plain": (distribute_tensor(torch.zeros(6), mesh, [Shard(0)]),
                                   r"params\[1\] is a plain tensor but exp_avgs\[1\] is a DTensor"),
    }[case]
    opt.state[plain if case == "dtensor_state_of_plain" else sharded]["exp_avg"] = replacement
    before = _full_copies(opt)
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    for a, b in zip(before, _full_copies(opt)):
        assert torch.equal(a, b)


def test_dtensor_step_of_two_calls_bumps_each_local_tensor_once(process_group):
    # Two buckets (float32 and float64): every call is validated before the
    # first writes (Note [validate only]), which reaches the local tensors
    # through the DTensor handler too; only the real call bumps their
    # versions, once per step, as a one-call step does.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    for dtypes in ((torch.float32, torch.float32), (torch.float32, torch.float64)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(distribute_tensor(torch.randn(8, 4, dtype=d), mesh, [Shard(0)]))
                  for d in dtypes]
        opt = fused_optim.Adam(params, lr=0.1)
        for step in range(3):
            for p in params:
                p.grad = distribute_tensor(torch.randn(8, 4, dtype=p.dtype), mesh, [Shard(0)])
            if step == 0:
                opt.step()
                continue
            written = [p for p in params] + [opt.state[p][k] for p in params
                                             for k in ("exp_avg", "exp_avg_sq")]
            before = [(t._version, t._local_tensor._version) for t in written]
            opt.step()
            # (the DTensors' own counters too, as an in-place op's dispatch
            # bumps both; the gradients' are left alone)
            assert [(t._version - v, t._local_tensor._version - lv)
                    for t, (v, lv) in zip(written, before)] == [(1, 1)] * 6, dtypes


@pytest.mark.parametrize("name,kwargs", [
    ("Adam", {"fused": True}), ("SGD", {"momentum": 0.9, "fused": True}),
    ("Lamb", {"master_weights": True}),
], ids=["Adam", "SGD", "Lamb"])
def test_dtensor_step_under_grad_scaler_is_the_plain_step(process_group, name, kwargs):
    # With fused=True or master weights, torch.amp.GradScaler hands our
    # step grad_scale and found_inf (_step_supports_amp_scaling; its
    # found_inf taken over DTensor gradients by DTensor's own handler): on
    # DTensor params (FSDP2 under fp16 autocast) the kernels unscale the
    # local shards' gradients in the step, and a step with an inf gradient
    # changes nothing. The same bits as the run on plain params, the
    # scaler's scale included.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    runs = []
    for sharded in (True, False):
        shard = _sharding(mesh if sharded else None)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(shard(torch.randn(8, 4))) for _ in range(3)]
        opt = getattr(fused_optim, name)(params, lr=0.1, **kwargs)
        assert opt._step_supports_amp_scaling
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        for step in range(5):
            scaler.scale(torch.ones(()))  # (the scale is made at the first scale())
            for i, p in enumerate(params):
                grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * step + i))
                if step == 2 and i == 1:
                    grad[0, 0] = float("inf")
                p.grad = shard(grad * scaler.get_scale())
            scaler.step(opt)
            scaler.update()
        runs.append((_full_copies(opt), scaler.get_scale()))
    (sharded_tensors, sharded_scale), (plain_tensors, plain_scale) = runs
    assert sharded_scale == plain_scale != 2.0**10
    assert len(sharded_tensors) == len(plain_tensors)
    for a, b in zip(sharded_tensors, plain_tensors):
        assert torch.equal(a, b)


@pytest.mark.parametrize("replaced", ["exp_avg", "grad"])
def test_dtensor_steps_check_what_changed_since_the_last(process_group, replaced):
    # The kept step's direct entry (_dtensor.direct_entry) takes the specs
    # it checked at the last step as checked: a state tensor or gradient
    # replaced since by one of another layout is refused, nothing written;
    # one of the same layout is the one updated or read.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
              for _ in range(3)]
    plain = [torch.nn.Parameter(p.full_tensor()) for p in params]
    opts = [fused_optim.Adam(ps, lr=0.1) for ps in (params, plain)]

    def set_grads(step):
        for i, (p, q) in enumerate(zip(params, plain)):
            grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * step + i))
            p.grad, q.grad = distribute_tensor(grad, mesh, [Shard(0)]), grad

    for step in range(3):
        set_grads(step)
        for opt in opts:
            opt.step()
    set_grads(3)
    wrong = distribute_tensor(torch.zeros(8, 4), mesh, [Shard(1)])
    if replaced == "grad":
        params[1].grad = wrong
    else:
        opts[0].state[params[1]]["exp_avg"] = wrong
    before = _full_copies(opts[0])
    with pytest.raises(RuntimeError, match=rf"{replaced}s\[1\] has mesh .* and placements \(Shard\(dim=1\),\)"):
        opts[0].step()
    for a, b in zip(before, _full_copies(opts[0])):
        assert torch.equal(a, b)
    set_grads(3)
    if replaced == "exp_avg":
        same_layout = distribute_tensor(opts[1].state[plain[1]]["exp_avg"].clone(), mesh, [Shard(0)])
        opts[0].state[params[1]]["exp_avg"] = same_layout
    for opt in opts:
        opt.step()
    if replaced == "exp_avg":
        assert opts[0].state[params[1]]["exp_avg"] is same_layout
    for a, b in zip(_full_copies(opts[0]), _full_copies(opts[1])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("entry", ["public", "fast"])
def test_op_on_dtensors_with_a_list_of_another_length_raises_the_ops_error(process_group, entry):
    # The handler leaves the length check to the op; it unwraps such a list
    # still, or the op would be dispatched to the handler again, without
    # end (a RecursionError, before this was fixed).
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fused_optim import _ops

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    lists = [[distribute_tensor(torch.randn(n), mesh, [Shard(0)]) for n in (4, 6)] for _ in range(4)]
    del lists[1][1]  # (one gradient for two params)
    signature = _ops.SIGNATURES["adam_"]
    values = signature.arguments(
        params=lists[0], grads=lists[1], states={"exp_avgs": lists[2], "exp_avg_sqs": lists[3]},
        master_params=[], steps=[torch.tensor(0.0), torch.tensor(0.0)], group_index=[0, 0],
        lr=[1e-2], hyper={"beta1": [0.9], "beta2": [0.999], "eps": [1e-8], "weight_decay": [0.0]},
        group_flags={"maximize": [False], "decoupled_weight_decay": [False]}, new_state=None,
        grad_scale=None, found_inf=None, modes={"amsgrad": False}, stochastic_rounding=False)
    before = [t.full_tensor().clone() for lst in lists for t in lst]
    with pytest.raises(RuntimeError, match=r"grads has 1 tensors but params has 2"):
        if entry == "public":
            positional = signature.num_positional
            torch.ops.fused_optim.adam_.default(
                *values[:positional], **dict(zip(signature.keywords, values[positional:])))
        else:
            fused_optim._C.adam_(*values)
    assert all(torch.equal(a, t.full_tensor()) for a, t in zip(before, [t for lst in lists for t in lst]))


def test_dtensor_step_with_a_partial_param_raises_and_writes_nothing(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (1,))
    torch.manual_seed(0)
    p = torch.nn.Parameter(DTensor.from_local(torch.randn(5), mesh, [Partial()]))
    p.grad = DTensor.from_local(torch.randn(5), mesh, [Partial()])
    opt = fused_optim.SGD([p], lr=0.1, momentum=0.9)
    before = p.to_local().clone()
    with pytest.raises(RuntimeError, match=r"params\[0\] has a Partial placement"):
        opt.step()
    assert torch.equal(p.to_local(), before) and not opt.state[p]


def test_eager_dtensor_step_calls_the_fast_entry_and_a_traced_one_the_public_op(
        process_group, monkeypatch):
    # An eager step on DTensors makes one call of the op's fast entry (Note
    # [fast op call]), on the plain local tensors: the kept step's direct
    # entry (_dtensor.direct_entry) checks and unwraps them itself, without
    # a call on the DTensors going through DTensor's dispatch (whose
    # per-tensor boxing cost more than the update on small shards), nor the
    # public op. Under torch.compile the local tensors are the trace's, and
    # the public op is called. Both give the plain step's bits.
    from torch.distributed.device_mesh import init_device_mesh

    calls = _record_fast_entry_calls(monkeypatch, "adam_")
    mesh = init_device_mesh("cpu", (1,))
    runs = []
    for compiled, on in ((False, mesh), (True, mesh), (False, None)):
        opt = _sharded_and_plain_adam(on)[2]
        torch._dynamo.reset()  # (earlier tests' compiled steps count toward the recompile limit)
        del calls[:]
        step = torch.compile(opt.step, backend="aot_eager") if compiled else opt.step
        step()
        if on is not None:
            expected = [] if compiled else [{torch.Tensor, torch.nn.Parameter}]
            assert calls == expected, (compiled, calls)
        runs.append(_full_copies(opt))
    for run in runs[:2]:
        for a, b in zip(run, runs[2]):
            assert torch.equal(a, b)


def test_dtensor_steps_of_the_general_path_call_the_fast_entry_on_local_tensors(
        process_group, monkeypatch):
    # A step the kept calls do not make (one with a gradient missing) goes
    # the general path, which also makes its call on DTensors through
    # _dtensor.direct_entry: one fast entry call per bucket, on the local
    # tensors, as the kept calls' steps. The plain run's bits.
    from torch.distributed.device_mesh import init_device_mesh

    calls = _record_fast_entry_calls(monkeypatch, "sgd_")
    mesh = init_device_mesh("cpu", (1,))
    runs = []
    for sharded in (True, False):
        shard = _sharding(mesh if sharded else None)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(shard(torch.randn(8, 4))) for _ in range(3)]
        opt = fused_optim.SGD(params, lr=0.1, momentum=0.9)
        per_step = []
        for step in range(4):
            for i, p in enumerate(params):
                grad = torch.randn(8, 4, generator=torch.Generator().manual_seed(10 * step + i))
                p.grad = None if (step == 2 and i == 1) else shard(grad)
            del calls[:]
            opt.step()
            per_step.append(list(calls))
        if sharded:
            # (step 2: the general path; the others: the kept calls)
            assert per_step == [[{torch.Tensor}]] * 4, per_step
        runs.append(_full_copies(opt))
    assert len(runs[0]) == len(runs[1])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("options", [
    {"state_dtype": torch.bfloat16}, {"stochastic_rounding": True}, {"state_dtype": torch.float32},
], ids=["bf16_state", "stochastic_rounding", "fp32_state"])
def test_dcp_loads_a_torch_checkpoint_into_ours_with_precision_options(tmp_path, options):
    # Set, the precision options are keys of our saved groups, which torch's
    # checkpoint lacks: DCP's default planner, which wants every key of ours
    # in the checkpoint, refuses it; a partial load takes it, the groups keep
    # the loader's options (configuration: Note [our options in param
    # groups]), and the run goes on with them.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _model(0).to(torch.bfloat16)
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    torch_opt.step()
    torch_opt.zero_grad()  # (DCP makes a fresh optimizer's state by a step of zero gradients)
    model_sd, optim_sd = get_state_dict(model, torch_opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path), no_dist=True)

    ours = fused_optim.AdamW(model.parameters(), lr=1e-2, **options)
    model_sd, optim_sd = get_state_dict(model, ours)
    into = {"model": model_sd, "optim": optim_sd}
    with pytest.raises(CheckpointException) as raised:  # (the rank's error in it)
        dcp.load(into, checkpoint_id=str(tmp_path), no_dist=True)
    key = next(iter(options))
    assert f"Missing key in checkpoint state_dict: optim.param_groups.0.{key}" in repr(raised.value)
    dcp.load(into, checkpoint_id=str(tmp_path), no_dist=True,
             planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(model, ours, model_state_dict=into["model"], optim_state_dict=into["optim"])
    for key, value in options.items():
        assert ours.param_groups[0][key] == value
    for p in model.parameters():
        assert float(ours.state[p]["step"]) == 1.0
        assert torch.equal(ours.state[p]["exp_avg"].float(), torch_opt.state[p]["exp_avg"].float())
        p.grad = torch.ones_like(p)
    ours.step()
    assert all(float(ours.state[p]["step"]) == 2.0 for p in model.parameters())
    state_dtype = options.get("state_dtype", torch.bfloat16)
    assert all(ours.state[p]["exp_avg"].dtype == state_dtype for p in model.parameters())


# How large-model stacks save the optimizer (torchtitan's OptimizersContainer,
# OLMo-core, NeMo): get_optimizer_state_dict(flatten_optimizer_state_dict=True),
# one key per param and group option; the loader reads every key of its own
# live groups from it.
_FLAT_PRECISIONS = {
    "plain": (torch.float32, {}),
    "bf16_state_rounding": (torch.bfloat16, {"state_dtype": torch.bfloat16,
                                             "stochastic_rounding": True}),
    "master_clipped": (torch.bfloat16, {"master_weights": True, "max_grad_norm": 0.5}),
}


def _train_in_two_groups(model, opt, steps):
    for step in steps:
        opt.zero_grad()
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step)).to(
            next(model.parameters()).dtype)
        model(x).float().square().mean().backward()
        opt.step()


def _two_groups(model, **kwargs):
    return [{"params": model[0].parameters()}, {"params": model[2].parameters(), **kwargs}]


def _flat_save_and_resume(tmp_path, build, dtype, steps=(3, 6)):
    """A model of `dtype` and its optimizer `build(model)` train 3 steps, are
    saved flattened through DCP, and train 3 more; another model at the
    saved weights, with another `build(model)`, loads and trains the same 3
    steps. Returns (model, optimizer, resumed model, its optimizer)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
    )

    flatten = StateDictOptions(flatten_optimizer_state_dict=True)
    model = _model(0).to(dtype)
    opt = build(model)
    _train_in_two_groups(model, opt, range(steps[0]))
    saved = [p.detach().clone() for p in model.parameters()]
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=flatten)},
             checkpoint_id=str(tmp_path), no_dist=True)
    _train_in_two_groups(model, opt, range(*steps))

    resumed = _model(1).to(dtype)
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), saved):
            p.copy_(q)
    other = build(resumed)
    into = {"optim": get_optimizer_state_dict(resumed, other, options=flatten)}
    dcp.load(into, checkpoint_id=str(tmp_path), no_dist=True)  # (the default planner)
    set_optimizer_state_dict(resumed, other, into["optim"], options=flatten)
    _train_in_two_groups(resumed, other, range(*steps))
    return model, opt, resumed, other


@pytest.mark.parametrize("precision", sorted(_FLAT_PRECISIONS))
@pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)
def test_dcp_flattened_checkpoint_resumes_ours_exactly(tmp_path, cfg, precision):
    # Our saved groups have the live groups' keys, our options included when
    # set: the flattened loader finds each (it raised KeyError for
    # 'param_groups.0.weight.state_dtype' when state_dict() left the
    # precision options out), and the resumed run is the uninterrupted one,
    # bit for bit, params and state.
    dtype, options = _FLAT_PRECISIONS[precision]
    if cfg.unfused and options:
        pytest.skip("the plain step refuses the precision options (test_caution.py)")

    def build(model):
        return cfg.ours_cls(_two_groups(model, lr=cfg.kwargs.get("lr", 1e-2) / 2),
                            **{**cfg.kwargs, **options})

    model, opt, resumed, other = _flat_save_and_resume(tmp_path, build, dtype)
    for key, value in options.items():
        assert all(g[key] == value for g in other.param_groups)
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(resumed.parameters(), model.parameters()):
        theirs, ours = opt.state[q], other.state[p]
        assert ours.keys() == theirs.keys()
        for name in theirs:
            assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("state_options", [
    {"full_state_dict": True}, {"full_state_dict": True, "cpu_offload": True},
    {"cpu_offload": True},
], ids=["full", "full_offload", "offload"])  # (flattened and full fails for torch.optim too)
def test_state_dict_options_that_copy_the_dict_take_our_state_dtype(process_group,
                                                                   state_options):
    # torch's gathering and offloading walk the dict and take no dtype
    # object: the saved groups name the state dtype ("torch.bfloat16"), and
    # the dict loads back (the loader keeps its own dtype).
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
    )

    options = StateDictOptions(**state_options)
    model = _model(0).to(torch.bfloat16)
    opt = fused_optim.AdamW(model.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    _train_in_two_groups(model, opt, range(2))
    saved = get_optimizer_state_dict(model, opt, options=options)
    assert {g["state_dtype"] for g in saved["param_groups"]} == {"torch.bfloat16"}
    model.zero_grad()  # (DCP makes a fresh optimizer's state only where no param has a gradient)
    other = fused_optim.AdamW(model.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    set_optimizer_state_dict(model, other, saved, options=options)
    assert other.param_groups[0]["state_dtype"] is torch.bfloat16
    for p in model.parameters():
        for key, value in opt.state[p].items():
            assert torch.equal(other.state[p][key], value), key


@pytest.mark.parametrize("name, options", [
    ("AdamW", {"state_dtype": torch.bfloat16, "stochastic_rounding": True}),
    ("Adam", {"master_weights": True}),
    ("SGD", {"stochastic_rounding": True}),
], ids=["bf16_state_rounding", "master", "sgd_rounding"])
def test_flattened_torch_checkpoint_into_ours_with_precision_options(tmp_path, name, options):
    # A flattened torch.optim checkpoint lacks our group keys: DCP's default
    # planner refuses it; a partial load leaves the template's own (the
    # loader's options), which torch's flattened loader then reads. The
    # state is torch's, the options the loader's, and the next step brings
    # the state to them (converted, master copies made from the params).
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
    )

    flatten = StateDictOptions(flatten_optimizer_state_dict=True)
    kwargs = {"lr": 1e-2, **({"momentum": 0.9} if name == "SGD" else {})}
    model = _model(0).to(torch.bfloat16)
    theirs = getattr(torch.optim, name)(model.parameters(), **kwargs)
    _train_in_two_groups(model, theirs, range(2))
    dcp.save({"optim": get_optimizer_state_dict(model, theirs, options=flatten)},
             checkpoint_id=str(tmp_path), no_dist=True)
    model.zero_grad()  # (DCP makes a fresh optimizer's state only where no param has a gradient)

    ours = getattr(fused_optim, name)(model.parameters(), **kwargs, **options)
    into = {"optim": get_optimizer_state_dict(model, ours, options=flatten)}
    with pytest.raises(CheckpointException, match="Missing key in checkpoint state_dict"):
        dcp.load(into, checkpoint_id=str(tmp_path), no_dist=True)
    into = {"optim": get_optimizer_state_dict(model, ours, options=flatten)}
    dcp.load(into, checkpoint_id=str(tmp_path), no_dist=True,
             planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(model, ours, into["optim"], options=flatten)
    for key, value in options.items():
        assert all(g[key] == value for g in ours.param_groups)
    for p in model.parameters():
        for key, value in theirs.state[p].items():
            assert torch.equal(ours.state[p][key].float(), value.float()), key
    _train_in_two_groups(model, ours, range(2, 3))
    for p in model.parameters():
        state = ours.state[p]
        if "state_dtype" in options:
            assert all(state[k].dtype == torch.bfloat16 for k in ("exp_avg", "exp_avg_sq"))
        if "master_weights" in options:
            assert state["master_param"].dtype == torch.float32
            assert torch.equal(state["master_param"].to(p.dtype), p.detach())
        if "step" in theirs.state[p]:
            assert float(state["step"]) == 3.0


def _reference_class(name):
    # The package each of ours mirrors: lion-pytorch's Lion, timm's Lars and
    # Lamb (or a skip where it is not installed).
    if name == "Lion":
        return pytest.importorskip("lion_pytorch", reason="lion-pytorch is not installed").Lion
    from harness import timm_optimizer
    return timm_optimizer(name.lower(), name)


@pytest.mark.parametrize("name", ["Lion", "Lars", "Lamb"])
def test_dcp_loads_a_reference_checkpoint_with_a_partial_load(tmp_path, name):
    # A DCP checkpoint of the package a class of ours mirrors lacks keys our
    # template asks for (Lion's and Lars's group options of ours, Lamb's
    # per-param step): with allow_partial_load it loads (README), and the
    # run goes on as the package's own (Lamb: from timm's group count).
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    kwargs = {"Lion": dict(lr=3e-3, weight_decay=0.1), "Lars": dict(lr=0.1, momentum=0.9),
              # (no decay, so no trust ratio, which would hide a wrong count)
              "Lamb": dict(lr=1e-2, weight_decay=0.0)}[name]

    def train(model, opt, steps):
        for step in steps:
            opt.zero_grad()
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            opt.step()

    model = _model(0)
    reference = _reference_class(name)(model.parameters(), **kwargs)
    train(model, reference, range(3))
    saved = [p.detach().clone() for p in model.parameters()]
    dcp.save({"optim": get_optimizer_state_dict(model, reference)}, checkpoint_id=str(tmp_path),
             no_dist=True)
    train(model, reference, range(3, 6))

    resumed = _model(1)
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), saved):
            p.copy_(q)
    ours = getattr(fused_optim, name)(resumed.parameters(), **kwargs)
    into = {"optim": get_optimizer_state_dict(resumed, ours)}
    dcp.load(into, checkpoint_id=str(tmp_path), no_dist=True,
             planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(resumed, ours, into["optim"])
    train(resumed, ours, range(3, 6))
    for p, q in zip(resumed.parameters(), model.parameters()):
        torch.testing.assert_close(p, q)


def test_dcp_loads_a_torch_sgd_checkpoint_into_stochastic_rounding_with_a_partial_load(tmp_path):
    # With stochastic rounding SGD keeps a per-param step (its rounding
    # streams), which torch.optim's SGD checkpoint lacks: a partial load
    # takes the rest (README), and the buffers are torch's.
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    model = _model(0).to(torch.bfloat16)
    torch_opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    for step in range(3):
        for i, p in enumerate(model.parameters()):
            grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            p.grad = grad.to(p.dtype)
        torch_opt.step()
    dcp.save({"optim": get_optimizer_state_dict(model, torch_opt)}, checkpoint_id=str(tmp_path),
             no_dist=True)
    torch_opt.zero_grad()  # (DCP makes a fresh optimizer's state only where no param has one)
    ours = fused_optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, stochastic_rounding=True)
    into = {"optim": get_optimizer_state_dict(model, ours)}
    assert all("step" in state for state in into["optim"]["state"].values())
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as raised:  # (the rank's error in it)
        dcp.load(into, checkpoint_id=str(tmp_path), no_dist=True)
    assert "Missing key in checkpoint state_dict: optim.state.0.weight.step" in repr(raised.value)
    into = {"optim": get_optimizer_state_dict(model, ours)}
    dcp.load(into, checkpoint_id=str(tmp_path), no_dist=True,
             planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(model, ours, into["optim"])
    for p in model.parameters():
        assert torch.equal(ours.state[p]["momentum_buffer"], torch_opt.state[p]["momentum_buffer"])
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    ours.step()
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
