"""The state arena (Note [state arena] in fused_optim/_arena.py): state the
step creates on the CPU is views of one buffer per state name and dtype,
with torch's shapes, strides and values; everything torch.optim users do
with state keeps working."""

from __future__ import annotations

import io

import pytest
import torch
from torch.testing import assert_close

import fused_optim
from harness import assert_optimizer_unchanged, assert_same_state, seeded_grads, snapshot_optimizer
from optim_configs import (DENSE_STATE_OPTIONS, NOT_IN_TORCH, OPTIMIZER_NAMES, low_precision_floor,
                           torch_class)

# float32 params with vector bodies and tails (one whose size-1 dim has an
# unusual stride), float64 ones, one channels_last (not packed: not
# contiguous) and one alone in its dtype (not packed: nothing to pack with)
F32_SHAPES = ((37,), (8, 5), (130,), (1,))
F64_SHAPES = ((19,), (3, 3))


def _params():
    gen = torch.Generator().manual_seed(0)
    f32 = [torch.randn(s, generator=gen) for s in F32_SHAPES]
    f32.append(torch.randn(1, 7, generator=gen).t())  # (7, 1), stride (1, 7)
    f64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in F64_SHAPES]
    channels_last = torch.randn(2, 3, 2, 2, generator=gen).to(memory_format=torch.channels_last)
    alone = torch.randn(5, generator=gen, dtype=torch.bfloat16)
    return [torch.nn.Parameter(p) for p in (*f32, *f64, channels_last, alone)]


def _set_grads(params, step):
    for p, g in zip(params, seeded_grads(step, torch.float64, params)):
        p.grad = g.to(p.dtype)


def _assert_param_close(p, q, where):
    # A bfloat16 param is held to the numerics policy's floor, one eps of
    # its largest magnitude (tests/optim_configs.py: torch rounds in
    # another order); the others to assert_close's defaults.
    if p.dtype == torch.bfloat16:
        floor = low_precision_floor(torch.bfloat16, q.float())
        assert_close(p.float(), q.float(), rtol=0, atol=floor, msg=where)
    else:
        assert_close(p, q, msg=where)


def _dense_state_names(opt):
    return opt._state_names(opt._mode(opt.param_groups[0]))


def _pair(name):
    ours_params, ref_params = _params(), _params()
    kwargs = {"lr": 0.01, **DENSE_STATE_OPTIONS[name]}
    ours = getattr(fused_optim, name)(ours_params, **kwargs)
    # (torch's single-tensor loop: the reference of the numerics policy,
    # tests/optim_configs.py; the reference classes have no such keyword)
    loop = {} if name in NOT_IN_TORCH else {"foreach": False}
    ref = torch_class(name)(ref_params, **kwargs, **loop)
    return (ours, ours_params), (ref, ref_params)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_new_state_is_views_of_one_buffer_per_name_and_dtype(name):
    (ours, params), (ref, ref_params) = _pair(name)
    for step in range(4):
        for opt, ps in ((ours, params), (ref, ref_params)):
            _set_grads(ps, step)
            opt.step()
        for i, (p, q) in enumerate(zip(params, ref_params)):
            _assert_param_close(p, q, f"{name} step {step} param {i}")
            assert_same_state(ours.state[p], ref.state[q], f"{name} step {step} param {i}")
    f32 = params[:len(F32_SHAPES) + 1]
    f64 = params[len(F32_SHAPES) + 1:len(F32_SHAPES) + 1 + len(F64_SHAPES)]
    channels_last, alone = params[-2:]
    storages = set()
    assert _dense_state_names(ours)
    for state_name in _dense_state_names(ours):
        for members in (f32, f64):
            tensors = [ours.state[p][state_name] for p in members]
            base = {t.untyped_storage().data_ptr() for t in tensors}
            assert len(base) == 1, f"{name} {state_name}: not one buffer"
            storages |= base
            for p, t in zip(members, tensors):
                assert (t.shape, t.stride()) == (p.shape, p.stride()), f"{name} {state_name}"
                assert t.data_ptr() % 64 == 0, f"{name} {state_name}: view not 64-byte aligned"
            ends = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors)
            assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:])), f"{name}: views overlap"
        for p in (channels_last, alone):
            t = ours.state[p][state_name]
            assert t.untyped_storage().data_ptr() not in storages, f"{name}: packed"
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
        assert ours.state[channels_last][state_name].stride() == channels_last.stride()
    assert len(storages) == 2 * len(_dense_state_names(ours))  # (a buffer per name and dtype)


def test_large_state_tensors_keep_their_own_memory():
    # (a long run already; packing would briefly double their memory)
    from fused_optim._arena import MAX_PACKED_ELEMENTS

    sizes = (MAX_PACKED_ELEMENTS, MAX_PACKED_ELEMENTS + 1, 40, MAX_PACKED_ELEMENTS + 7)
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    opt = fused_optim.Adam(params, lr=0.01)
    _set_grads(params, 0)
    opt.step()
    storage = {i: opt.state[p]["exp_avg"].untyped_storage().data_ptr() for i, p in enumerate(params)}
    assert storage[0] == storage[2]  # (at the cap: packed)
    assert len({storage[0], storage[1], storage[3]}) == 3
    for i in (1, 3):
        t = opt.state[params[i]]["exp_avg"]
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_adagrad_sums_are_packed_at_construction():
    params = _params()[:len(F32_SHAPES)]
    opt = fused_optim.Adagrad(params, lr=0.1, initial_accumulator_value=0.25)
    sums = [opt.state[p]["sum"] for p in params]
    assert len({t.untyped_storage().data_ptr() for t in sums}) == 1
    for t in sums:
        assert torch.equal(t, torch.full_like(t, 0.25))


def test_state_starting_at_different_values_shares_one_buffer():
    # (each group its own initial_accumulator_value: each view filled with
    # its own, in the buffer of its name and dtype; the state a step makes
    # for a group added later too)
    params = _params()[:len(F32_SHAPES)]
    later = [torch.nn.Parameter(torch.randn(n)) for n in (20, 3)]
    values = (0.25, 0.0, 4.0, -0.0)
    opt = fused_optim.Adagrad([{"params": [p], "initial_accumulator_value": v}
                               for p, v in zip(params, values)], lr=0.1)
    opt.add_param_group({"params": later[:1], "initial_accumulator_value": 1.5})
    opt.add_param_group({"params": later[1:], "initial_accumulator_value": 2.5})
    sums = [opt.state[p]["sum"] for p in params]
    assert len({t.untyped_storage().data_ptr() for t in sums}) == 1
    for p, t, v in zip(params, sums, values):
        assert torch.equal(t, torch.full_like(p, v)) and t.stride() == p.stride()
    for p in (*params, *later):
        p.grad = torch.ones_like(p)
    opt.step()
    for p, v in zip((*params, *later), (*values, 1.5, 2.5)):
        assert torch.equal(opt.state[p]["sum"], torch.full_like(p, v + 1.0))


@pytest.mark.parametrize("name", ["SGD", "Adam", "Lamb"])
def test_a_failed_first_step_leaves_no_state(name):
    (opt, params), (ref, ref_params) = _pair(name)
    _set_grads(params, 0)
    params[2].grad.resize_(3)  # (a wrong shape, past torch's setter: the op refuses the call)
    before = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    assert_optimizer_unchanged(opt, before, name)
    for step in range(2):  # (the fixed step makes and packs the state)
        for o, ps in ((opt, params), (ref, ref_params)):
            _set_grads(ps, step)
            o.step()
    for p, q in zip(params, ref_params):
        _assert_param_close(p, q, name)
        assert_same_state(opt.state[p], ref.state[q], name)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_packed_state_is_saved_once_and_loads_as_views_again(name):
    (opt, params), _ = _pair(name)
    for step in range(2):
        _set_grads(params, step)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    # Each buffer saved once: no larger than the same state in tensors of
    # their own but for the views' padding (a view saved with its whole
    # buffer would add the buffer again per view).
    own = opt.state_dict()
    own["state"] = {i: {k: v.clone() if torch.is_tensor(v) and v.dim() else v
                        for k, v in s.items()} for i, s in own["state"].items()}
    own_buffer = io.BytesIO()
    torch.save(own, own_buffer)
    views = sum(torch.is_tensor(v) and v.dim() > 0 for s in own["state"].values() for v in s.values())
    assert len(buffer.getvalue()) <= len(own_buffer.getvalue()) + 64 * views
    buffer.seek(0)
    loaded_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = getattr(fused_optim, name)(loaded_params, lr=0.01, **DENSE_STATE_OPTIONS[name])
    loaded.load_state_dict(torch.load(buffer))
    state_name = _dense_state_names(opt)[0]
    f32 = loaded_params[:len(F32_SHAPES)]
    assert len({loaded.state[p][state_name].untyped_storage().data_ptr() for p in f32}) == 1
    for step in range(2, 4):
        for o, ps in ((opt, params), (loaded, loaded_params)):
            _set_grads(ps, step)
            o.step()
    for p, q in zip(params, loaded_params):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, loaded.state[q][key]), f"{name} {key}"


def test_one_state_tensor_changed_in_place_changes_no_other():
    (opt, params), _ = _pair("Adam")
    _set_grads(params, 0)
    opt.step()
    others = [opt.state[p]["exp_avg"].clone() for p in params]
    opt.state[params[1]]["exp_avg"].fill_(7.0)
    for i, p in enumerate(params):
        if i != 1:
            assert torch.equal(opt.state[p]["exp_avg"], others[i])


def test_state_made_in_a_compiled_step_is_not_packed():
    # (aliased mutated inputs cost torch.compile time: Note [state arena])
    torch._dynamo.reset()
    params = [torch.nn.Parameter(torch.randn(n)) for n in (33, 17)]
    opt = fused_optim.Adam(params, lr=0.01)
    _set_grads(params, 0)
    torch.compile(opt.step)()
    storages = {opt.state[p]["exp_avg"].untyped_storage().data_ptr() for p in params}
    assert len(storages) == 2


def test_dcp_writes_each_packed_tensor_alone_and_loads_it_back(tmp_path):
    # (DCP copies a view whose storage is larger than it: a checkpoint of
    # packed state is the size of one of unpacked state)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def trained(steps):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(4)])
        opt = fused_optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(steps):
            _set_grads(list(model.parameters()), step)
            opt.step()
        return model, opt

    def saved_bytes(model, opt, where):
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(where), no_dist=True)
        return sum(f.stat().st_size for f in where.iterdir())

    model, opt = trained(3)
    first = next(model.parameters())
    assert opt.state[first]["exp_avg"].untyped_storage().nbytes() > first.numel() * 4  # (packed)
    packed_bytes = saved_bytes(model, opt, tmp_path / "a")
    loaded_model, loaded = trained(1)
    model_sd, optim_sd = get_state_dict(loaded_model, loaded)
    into = {"model": model_sd, "optim": optim_sd}
    dcp.load(into, checkpoint_id=str(tmp_path / "a"), no_dist=True)
    set_state_dict(loaded_model, loaded, model_state_dict=into["model"], optim_state_dict=into["optim"])
    for p, q in zip(model.parameters(), loaded_model.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, loaded.state[q][key]), key
    for state in opt.state.values():
        for key, value in list(state.items()):
            if value.dim():
                state[key] = value.clone()
    assert packed_bytes == saved_bytes(model, opt, tmp_path / "b")


def test_differentiable_adagrad_steps_through_the_state_made_at_construction():
    # Adagrad makes its state when built; a group that torch's code steps
    # (differentiable=True) gets tensors of their own, as torch makes them,
    # and its in-place updates record history: the gradient reaches the
    # gradient that went into the step, as torch's. (Views of one buffer
    # refused the second param's update: "a leaf Variable that requires
    # grad is being used in an in-place operation".)
    results = []
    for cls in (fused_optim.Adagrad, torch.optim.Adagrad):
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
        grads = [torch.randn(t.shape, generator=gen, dtype=torch.float64, requires_grad=True)
                 for t in (weight, bias)]
        params = [weight.clone(), bias.clone()]  # (non-leaf params, as torch's own tests)
        opt = cls(params, lr=0.1, differentiable=True)
        for p, g in zip(params, grads):
            assert opt.state[p]["sum"].untyped_storage().nbytes() == p.numel() * 8
            p.grad = g * 1.0
        opt.step()
        out = sum((p * p).sum() + opt.state[p]["sum"].sum() for p in params)
        results.append((params, [opt.state[p]["sum"] for p in params],
                        torch.autograd.grad(out, grads)))
    (ours, ours_sums, ours_grads), (ref, ref_sums, ref_grads) = results
    for a, b in zip((*ours, *ours_sums, *ours_grads), (*ref, *ref_sums, *ref_grads)):
        assert_close(a, b)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_a_differentiable_step_takes_packed_state_out_of_the_arena(name):
    # State packed by fused steps, then the optimizer turned differentiable
    # (torch's code steps it, recording history in place on the state):
    # each param's state leaves the arena first, and the step is torch's,
    # gradient included.
    results = []
    for cls in (getattr(fused_optim, name), getattr(torch.optim, name)):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (37, 8, 130)]
        opt = cls(params, lr=0.1, **DENSE_STATE_OPTIONS[name])
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            opt.step()
        if cls.__module__.startswith("fused_optim"):
            first = opt.state[params[0]][_dense_state_names(opt)[0]]
            assert first.untyped_storage().nbytes() > first.numel() * 8  # (packed)
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64, requires_grad=True)
                 for p in params]
        opt.defaults["differentiable"] = opt.param_groups[0]["differentiable"] = True
        for p, g in zip(params, grads):
            p.grad = g * 1.0
        opt.step()
        state = [{k: v for k, v in opt.state[p].items() if k != "step"} for p in params]
        out = sum(p.sum() + sum(v.sum() for v in s.values()) for p, s in zip(params, state))
        results.append((params, state, torch.autograd.grad(out, grads)))
    (ours, ours_state, ours_grads), (ref, ref_state, ref_grads) = results
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert_close(p, q, msg=f"{name} param {i}")
        assert ours_state[i].keys() == ref_state[i].keys()
        for key, value in ref_state[i].items():
            assert_close(ours_state[i][key], value, msg=f"{name} param {i} {key}")
    for g, h in zip(ours_grads, ref_grads):
        assert_close(g, h)
