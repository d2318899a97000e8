"""torch.optim's behaviour as the contract, where it is not about the math:
the implementation keywords (fused=False, foreach, differentiable=True run
torch's own code), gradients left alone, state_dict / load_state_dict with
every hook and with non-param entries, a failed first step that changes
nothing, and torch.compile putting our op in the graph."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fused_optim
from fused_optim import _ops
from fused_optim._step import StepProtocol
from fused_optim._traced import TracedStep
from harness import assert_optimizer_unchanged, assert_same_state, snapshot_optimizer
from optim_configs import (DENSE_STATE_OPTIONS, HAS_FUSED, NOT_IN_TORCH, ONE_PER_OPTIMIZER,
                           OPTIM_CONFIGS, OPTIMIZER_NAMES)

# The optimizers that torch.optim has (its implementation keywords,
# differentiable steps): Lion has neither.
IN_TORCH = [n for n in OPTIMIZER_NAMES if n not in NOT_IN_TORCH]

ONE_EACH = pytest.mark.parametrize("cfg", ONE_PER_OPTIMIZER, ids=str)


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5)
    ).to(dtype)


def _groups(model, **second):
    return [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), **second},
    ]


def _set_grads(models, step):
    for i, params in enumerate(zip(*(m.parameters() for m in models))):
        torch.manual_seed(100 * step + i)
        g = torch.randn_like(params[0])
        for p in params:
            p.grad = g.clone()


def _assert_equal_runs(model_a, opt_a, model_b, opt_b, exact=True):
    check = (lambda a, b: torch.equal(a, b)) if exact else None
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        if exact:
            assert torch.equal(a, b), (a - b).abs().max()
        else:
            torch.testing.assert_close(a, b)
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), (k, sa[k].keys(), sb[k].keys())
        for n in sa[k]:
            if exact:
                assert check(sa[k][n], sb[k][n]), f"state[{k}][{n}]"
            else:
                torch.testing.assert_close(sa[k][n], sb[k][n])


# ----- implementation keywords ------------------------------------------------------


UNFUSED = [c for c in OPTIM_CONFIGS if c.name in HAS_FUSED]


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("cfg", UNFUSED, ids=str)
def test_fused_false_is_torchs_unfused_step(cfg, foreach):
    # fused=False runs torch.optim's own code: the same bits as
    # torch.optim.X(fused=False, foreach=...), params and state.
    models = [_model(), _model()]
    kwargs = dict(cfg.kwargs, fused=False, foreach=foreach)
    ours = cfg.ours_cls(_groups(models[0], lr=cfg.lr / 2), **kwargs)
    ref = cfg.torch_cls(_groups(models[1], lr=cfg.lr / 2), **kwargs)
    assert not ours._step_supports_amp_scaling  # GradScaler unscales, as for torch's
    for step in range(6):
        _set_grads(models, step)
        ours.step()
        ref.step()
    _assert_equal_runs(models[0], ours, models[1], ref)


@pytest.mark.parametrize("name", IN_TORCH)
def test_differentiable_step_is_torchs(name):
    # differentiable=True: the step is recorded by autograd, as torch's:
    # the same values and the same gradients through two steps, with
    # respect to the initial params and to the gradients.
    results = []
    for cls in (getattr(torch.optim, name), getattr(fused_optim, name)):
        torch.manual_seed(0)
        w0 = torch.randn(6, dtype=torch.float64, requires_grad=True)
        g = torch.randn(6, dtype=torch.float64, requires_grad=True)
        p = w0.clone()  # non-leaf, as differentiable optimizers are used
        kwargs = dict(lr=0.1, differentiable=True)
        if name == "SGD":
            kwargs["momentum"] = 0.9
        opt = cls([p], **kwargs)
        for _ in range(2):
            p.grad = g * 1.5
            opt.step()
        out = (p * torch.arange(6.0, dtype=torch.float64)).sum()
        results.append((p.detach().clone(), torch.autograd.grad(out, (w0, g))))
    (p_ref, grads_ref), (p_ours, grads_ours) = results
    torch.testing.assert_close(p_ours, p_ref, rtol=0, atol=0)
    for a, b in zip(grads_ours, grads_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(HAS_FUSED))
def test_one_unfused_group_among_fused_ones(name):
    # fused is a per-group option in torch: a group with fused=False runs
    # torch's code, the others our kernels; both as torch.optim does.
    models = [_model(), _model()]
    ours = getattr(fused_optim, name)(_groups(models[0], fused=False, foreach=False), lr=0.05)
    ref = getattr(torch.optim, name)(_groups(models[1], fused=False, foreach=False), lr=0.05,
                                     foreach=False)
    for step in range(5):
        _set_grads(models, step)
        ours.step()
        ref.step()
    # group 1 is torch's code in both: bitwise
    for a, b in zip(models[0][2].parameters(), models[1][2].parameters()):
        assert torch.equal(a, b)
    _assert_equal_runs(models[0], ours, models[1], ref, exact=False)


@pytest.mark.parametrize("mixed", [False, True], ids=["all_unfused", "one_group_unfused"])
def test_unfused_groups_under_grad_scaler(mixed):
    # GradScaler: for an unfused optimizer it unscales itself (as for
    # torch's); built with fused=True it hands us the scale, and a group
    # with fused=False has its gradients unscaled here. Inf steps are skipped.
    models = [_model(), _model()]
    if mixed:
        ours = fused_optim.Adam(_groups(models[0], fused=False), lr=0.01, fused=True)
    else:
        ours = fused_optim.Adam(_groups(models[0]), lr=0.01, fused=False)
    assert ours._step_supports_amp_scaling == mixed
    ref = torch.optim.Adam(_groups(models[1], fused=False), lr=0.01, fused=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2) for _ in range(2)]
    for step in range(7):
        for model in models:
            model.zero_grad()
            torch.manual_seed(step)
            x = torch.randn(4, 7)
            if step == 3:
                x[0, 0] = float("inf")
            loss = model(x).square().mean()
            scalers[models.index(model)].scale(loss).backward()
        for scaler, opt in zip(scalers, (ours, ref)):
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
    _assert_equal_runs(models[0], ours, models[1], ref, exact=not mixed)


def test_foreach_true_with_fused_none_is_our_fused_step(monkeypatch):
    # foreach=True asks for a multi-tensor step: ours (Note
    # [implementation keywords]); with capturable=True, a tensor lr as in
    # torch (which refuses one with foreach=True otherwise: test_errors).
    calls = []
    # (a fast call returns whether it was made: Note [gradients read in C++])
    monkeypatch.setattr(_ops, "fast_function", lambda call: lambda *args: calls.append(call.name) or True)
    model = _model()
    opt = fused_optim.Adam(model.parameters(), lr=torch.tensor(0.01), foreach=True,
                           capturable=True)
    _set_grads([model], 0)
    opt.step()
    assert calls == ["adam_"]


# ----- gradients are not written ------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_gradient_versions_unchanged_by_a_step(name):
    model = _model()
    opt = getattr(fused_optim, name)(model.parameters(), lr=0.01)
    _set_grads([model], 0)
    versions = [p.grad._version for p in model.parameters()]
    opt.step()
    assert [p.grad._version for p in model.parameters()] == versions


@pytest.mark.parametrize("cfg", [c for c in ONE_PER_OPTIMIZER if c.name in IN_TORCH], ids=str)
def test_swap_in_params_and_state_steps_as_torchs(cfg):
    # torch.optim._stateless.swap_in_optimizer_params_and_state steps other
    # params and state (fake ones, to trace the step) on the live optimizer;
    # it requires state_dict()'s group keys to be the live groups' (Note
    # [our options in param groups]). The swapped-in params and state step
    # as torch's do; the live ones are left as they were and go on alike.
    from torch.optim._stateless import swap_in_optimizer_params_and_state

    runs = []
    for cls in (cfg.torch_cls, cfg.ours_cls):
        model = _model()
        opt = cls(_groups(model, lr=0.003), **cfg.kwargs)
        _set_grads([model], 0)
        opt.step()
        swapped = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        for i, p in enumerate(swapped.values()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        swapped_state = copy.deepcopy(opt.state_dict())
        live = snapshot_optimizer(opt)
        live_params = [p.detach().clone() for p in model.parameters()]
        with swap_in_optimizer_params_and_state(opt, swapped, swapped_state):
            opt.step()
        assert_optimizer_unchanged(opt, live, f"{cls.__module__} live optimizer")
        assert all(map(torch.equal, model.parameters(), live_params))
        assert not any(map(torch.equal, swapped.values(), live_params))  # (they stepped)
        _set_grads([model], 2)
        opt.step()
        runs.append((model, opt, swapped, swapped_state))
    (t_model, t_opt, t_swapped, t_state), (o_model, o_opt, o_swapped, o_state) = runs
    _assert_equal_runs(t_model, t_opt, o_model, o_opt, exact=False)
    for name in t_swapped:
        torch.testing.assert_close(o_swapped[name], t_swapped[name])
    assert o_state["state"].keys() == t_state["state"].keys()
    for i, t_param_state in t_state["state"].items():
        for key, value in t_param_state.items():
            torch.testing.assert_close(o_state["state"][i][key], value, msg=f"state {i} {key}")


def test_swap_in_params_and_state_with_precision_options():
    # Set, the precision options are saved group keys too, so swap-in (which
    # wants the saved keys to be the live ones) takes such an optimizer: the
    # swapped-in params step, the live ones and their state stay as they were.
    from torch.optim._stateless import swap_in_optimizer_params_and_state

    model = _model().to(torch.bfloat16)
    opt = fused_optim.AdamW(model.parameters(), lr=0.01, state_dtype=torch.bfloat16,
                            stochastic_rounding=True)
    _set_grads([model], 0)
    opt.step()
    swapped = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    for i, p in enumerate(swapped.values()):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p.dtype)
    before = {n: p.detach().clone() for n, p in swapped.items()}
    live = snapshot_optimizer(opt)
    live_params = [p.detach().clone() for p in model.parameters()]
    with swap_in_optimizer_params_and_state(opt, swapped, copy.deepcopy(opt.state_dict())):
        opt.step()
    assert_optimizer_unchanged(opt, live, "live optimizer")
    assert all(map(torch.equal, model.parameters(), live_params))
    assert not any(torch.equal(swapped[n], before[n]) for n in swapped)  # (they stepped)


@pytest.mark.parametrize("cfg", [c for c in ONE_PER_OPTIMIZER if c.name in IN_TORCH], ids=str)
def test_flattened_dcp_state_dict_moves_between_torch_and_ours(cfg):
    # torch.distributed.checkpoint's state_dict API with
    # flatten_optimizer_state_dict=True (torchtitan's checkpoints), in one
    # process: a dict taken from either optimizer loads into the other and
    # both go on alike; taken from an optimizer that has not stepped, it
    # steps it once with lr 0 and zero gradients (_init_optim_state) and
    # leaves the params and lr as they were, with torch's state.
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    for source, target in ((cfg.ours_cls, cfg.torch_cls), (cfg.torch_cls, cfg.ours_cls)):
        model = _model()
        opt = source(_groups(model, lr=0.003), **cfg.kwargs)
        for step in range(3):
            _set_grads([model], step)
            opt.step()
        saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=flat))
        assert any(key.startswith("state.") for key in saved), sorted(saved)
        resumed = copy.deepcopy(model)
        resumed_opt = target(_groups(resumed, lr=0.003), **cfg.kwargs)
        set_optimizer_state_dict(resumed, resumed_opt, saved, options=flat)
        for step in range(3, 6):
            _set_grads([model, resumed], step)
            opt.step()
            resumed_opt.step()
        _assert_equal_runs(model, opt, resumed, resumed_opt, exact=False)

    fresh = []
    for cls in (cfg.torch_cls, cfg.ours_cls):
        model = _model()
        opt = cls(_groups(model, lr=torch.tensor(0.003)), **cfg.kwargs)
        before = [p.detach().clone() for p in model.parameters()]
        lrs = [float(g["lr"]) for g in opt.param_groups]
        taken = get_optimizer_state_dict(model, opt, options=flat)
        assert all(map(torch.equal, model.parameters(), before))
        assert all(p.grad is None for p in model.parameters())
        assert [float(g["lr"]) for g in opt.param_groups] == lrs
        fresh.append((model, opt, taken))
    (t_model, t_opt, t_taken), (o_model, o_opt, o_taken) = fresh
    _assert_equal_runs(t_model, t_opt, o_model, o_opt, exact=False)
    assert o_taken.keys() == t_taken.keys()


@pytest.mark.parametrize("mixed", [False, True], ids=["all_differentiable", "one_fused_group"])
def test_differentiable_groups_options_are_left_to_torch(mixed):
    # A differentiable=True group's options may be tensors that require
    # grad; only torch's code, which steps that group, reads them (as
    # floats they would warn, "Converting a tensor with requires_grad=True
    # to a scalar", the step running with grad on), however many groups
    # our op steps.
    def options():
        return {"lr": torch.tensor(0.01, dtype=torch.float64, requires_grad=True),
                "betas": (torch.tensor(0.8, dtype=torch.float64, requires_grad=True),
                          torch.tensor(0.99, dtype=torch.float64, requires_grad=True))}

    runs = []
    for cls in (torch.optim.Adam, fused_optim.Adam):
        torch.manual_seed(0)
        # (differentiable: params that are not leaves, as torch's tests)
        differentiable = torch.rand(9, dtype=torch.float64, requires_grad=True).clone()
        plain = torch.rand(7, dtype=torch.float64)
        first = {"params": [plain], "lr": 0.003, "differentiable": False} if mixed else {
            "params": [plain.requires_grad_().clone()], **options()}
        opt = cls([first, {"params": [differentiable], **options()}], differentiable=True)
        params = [g["params"][0] for g in opt.param_groups]
        warn_always = torch.is_warn_always_enabled()
        torch.set_warn_always(True)  # (torch warns of it once a process)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                for step in range(3):
                    for i, p in enumerate(params):
                        p.grad = torch.randn(p.shape, dtype=p.dtype,
                                             generator=torch.Generator().manual_seed(10 * step + i))
                    opt.step()
        finally:
            torch.set_warn_always(warn_always)
        runs.append(params)
    for ours, theirs in zip(runs[1], runs[0]):
        torch.testing.assert_close(ours, theirs)


# ----- state_dict / load_state_dict: non-param entries, hooks ------------------------------


@ONE_EACH
def test_non_param_state_entries_as_torch(cfg):
    # torch keeps non-param keys of `state` (hooks put flags there) through
    # state_dict and load_state_dict; so do we, and the step ignores them.
    dicts = []
    for cls in (cfg.torch_cls, cfg.ours_cls):
        model = _model()
        opt = cls(_groups(model), **cfg.kwargs)
        _set_grads([model], 0)
        opt.step()
        opt.state["flag"] = True
        sd = opt.state_dict()
        fresh = cls(_groups(_model(1)), **cfg.kwargs)
        fresh.register_load_state_dict_post_hook(lambda o: o.state.__setitem__("loaded", 1))
        fresh.load_state_dict(sd)
        assert fresh.state["flag"] is True and fresh.state["loaded"] == 1
        _set_grads([model], 1)
        fresh.step()
        dicts.append(sorted(map(str, fresh.state_dict()["state"])))
    assert dicts[0] == dicts[1]


def test_state_dict_hooks_run_as_torchs():
    outputs = []
    for cls in (torch.optim.Adam, fused_optim.Adam):
        model = _model()
        opt = cls(_groups(model), lr=0.01)
        _set_grads([model], 0)
        opt.step()
        seen = []
        opt.register_state_dict_pre_hook(lambda o: seen.append("pre"))
        opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd["param_groups"][0])))

        def replace(o, sd):
            sd = dict(sd)
            sd["extra"] = "added by a hook"
            return sd

        opt.register_state_dict_post_hook(replace)
        sd = opt.state_dict()
        outputs.append((seen, sorted(sd), sd["extra"]))
    assert outputs[0] == outputs[1]


def test_load_state_dict_hooks_run_as_torchs():
    # pre-hooks run first and may replace the dict (our checks see the
    # replaced one); post-hooks run last and see the loaded, converted state.
    model = _model(dtype=torch.bfloat16)
    opt = fused_optim.AdamW(_groups(model), lr=0.01, master_weights=True)
    _set_grads([model], 0)
    opt.step()
    sd = opt.state_dict()
    broken = dict(sd, param_groups=sd["param_groups"][:1])  # one group short

    target = fused_optim.AdamW(_groups(_model(1, torch.bfloat16)), lr=0.01, master_weights=True)
    order = []
    target.register_load_state_dict_pre_hook(lambda o, d: order.append("pre 1") or sd)
    target.register_load_state_dict_pre_hook(
        lambda o, d: order.append(("pre 2", len(d["param_groups"]))))

    def post(o):
        master = next(iter(o.state.values()))["master_param"]
        order.append(("post", master.dtype))

    target.register_load_state_dict_post_hook(post)
    target.load_state_dict(broken)
    assert order == ["pre 1", ("pre 2", 2), ("post", torch.float32)]


def test_failed_load_after_pre_hooks_changes_nothing():
    model = _model()
    opt = fused_optim.Adam(_groups(model), lr=0.01)
    _set_grads([model], 0)
    opt.step()
    snap = snapshot_optimizer(opt)
    sd = opt.state_dict()
    opt.register_load_state_dict_pre_hook(
        lambda o, d: dict(d, param_groups=d["param_groups"][:1]))
    with pytest.raises(ValueError, match="number of parameter groups"):
        opt.load_state_dict(sd)
    assert_optimizer_unchanged(opt, snap, "failed load")


# ----- a failed first step changes nothing ------------------------------------------------


def _bad_second_group(model):
    # A sparse gradient: refused by Adam, AdamW and RMSprop, and with
    # weight decay (the group has some) by SGD and Adagrad, as torch does.
    model[2].weight.grad = model[2].weight.grad.to_sparse()


REBUILDS = {
    "first_step": lambda opt, model: None,
    "group_added": lambda opt, model: opt.add_param_group(
        {"params": [torch.nn.Parameter(torch.randn(4))]}),
    "mode_changed": lambda opt, model: opt.param_groups[1].__setitem__(
        "maximize", not opt.param_groups[1]["maximize"]),
}


@pytest.mark.parametrize("rebuild", sorted(REBUILDS))
@pytest.mark.parametrize("cfg", [c for c in OPTIM_CONFIGS if c.large
                                 or c.id == "sgd_momentum_dampening_wd"], ids=str)
def test_failed_first_step_changes_nothing(cfg, rebuild):
    # Whatever made the plan be rebuilt, a step that raises leaves the
    # optimizer as it was, and the next good step is a never-failed run's.
    models = [_model(), _model()]
    opts = [cfg.ours_cls(_groups(m, weight_decay=0.01), **cfg.kwargs) for m in models]
    for opt, model in zip(opts, models):
        REBUILDS[rebuild](opt, model)
    snap = snapshot_optimizer(opts[0])
    _set_grads([models[0]], 0)
    _bad_second_group(models[0])
    with pytest.raises(RuntimeError, match="sparse"):
        opts[0].step()
    assert_optimizer_unchanged(opts[0], snap, "failed first step")
    for step in range(3):
        _set_grads(models, step)
        for opt in opts:
            opt.step()
    _assert_equal_runs(models[0], opts[0], models[1], opts[1])


# ----- optimizer in backward ----------------------------------------------------------------


@ONE_EACH
def test_optimizer_in_backward_as_torch(cfg):
    # One optimizer (and scheduler) per param, stepped by the param's
    # post-accumulate-grad hook inside backward, which then drops the
    # gradient: torchtune's optimizer_in_bwd and torch's
    # _apply_optimizer_in_backward, so that no step waits for the whole
    # backward. Each step is a one-param call made from the autograd engine.
    runs = []
    for cls, extra in ((cfg.torch_cls, {"foreach": False}), (cfg.ours_cls, {})):
        model = _model()
        opts = {p: cls([p], **cfg.kwargs, **extra) for p in model.parameters()}
        schedulers = {p: _lr_schedule(opt) for p, opt in opts.items()}

        def step_in_backward(p, opts=opts, schedulers=schedulers):
            opts[p].step()
            opts[p].zero_grad()
            schedulers[p].step()

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(step_in_backward)
        for step in range(6):
            torch.manual_seed(step)
            model(torch.randn(4, 7)).square().mean().backward()
            assert all(p.grad is None for p in model.parameters())
        runs.append((model, opts))
    (ref_model, ref_opts), (model, opts) = runs
    initial = list(_model().parameters())
    for i, (p, r) in enumerate(zip(model.parameters(), ref_model.parameters())):
        torch.testing.assert_close(p, r)
        assert not torch.equal(p, initial[i])  # (it moved)
        assert_same_state(opts[p].state[p], ref_opts[r].state[r], f"{cfg} param {i}")
        assert opts[p].param_groups[0]["lr"] == ref_opts[r].param_groups[0]["lr"]


# ----- torch.compile ----------------------------------------------------------------------


def _lr_schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_compiled_step_equals_eager(name, device):
    # torch's compiled-optimizer recipe: a tensor lr (a scheduler changes it
    # in place, no recompile), torch.compile(opt.step). The op is in the
    # graph, no graph break inside our step, same bits as eager.
    torch._dynamo.reset()
    models = [_model().to(device), _model().to(device)]
    kwargs = dict(lr=torch.tensor(0.01, device=device))
    if name == "SGD":
        kwargs["momentum"] = 0.9
    opts = [getattr(fused_optim, name)(_groups(m), **kwargs) for m in models]
    scheds = [_lr_schedule(o) for o in opts]
    compiled = torch.compile(opts[0].step, backend="aot_eager")
    _set_grads(models, 0)
    explained = torch._dynamo.explain(opts[1].step)()  # (steps models[1] eagerly)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert any(f"fused_optim.{_ops_name(name)}" in g.code for g in explained.graphs)
    compiled()
    for s in scheds:
        s.step()
    for step in range(1, 4):
        _set_grads(models, step)
        compiled()
        opts[1].step()
        for s in scheds:
            s.step()
    _assert_equal_runs(models[0], opts[0], models[1], opts[1])


def _ops_name(name):
    return getattr(fused_optim, name)._op_name


def test_fullgraph_fails_only_at_torchs_use_grad_break():
    # torch.optim's step has the same two graph breaks (_use_grad, around
    # the step, so that AOT sees a no_grad graph); under fullgraph=True they
    # are the failure, for torch's optimizers and ours alike.
    for cls in (torch.optim.Adam, fused_optim.Adam):
        torch._dynamo.reset()
        model = _model()
        opt = cls(model.parameters(), lr=torch.tensor(0.01))
        _set_grads([model], 0)
        with pytest.raises(Exception, match="graph_break") as info:
            torch.compile(opt.step, fullgraph=True, backend="aot_eager")()
        assert "_use_grad" in str(info.value) or "optimizer.py" in str(info.value)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_step_unwrapped_twice_is_the_raw_step_and_compiles_whole(name):
    # torch's compiled-optimizer tests compile opt.step.__wrapped__.__wrapped__
    # (past profile_hook_step and _use_grad_for_differentiable: no graph
    # break) with fullgraph=True, grad mode off around the call. Ours has
    # the same two wrappers; the raw step traces whole and equals eager.
    torch._dynamo.reset()
    torch_raw = torch.optim.Adam(_model().parameters()).step.__wrapped__.__wrapped__
    assert not hasattr(torch_raw, "__wrapped__")  # (the idiom, on torch's own)
    models = [_model(), _model()]
    opts = [getattr(fused_optim, name)(_groups(m), lr=0.01, **DENSE_STATE_OPTIONS[name])
            for m in models]
    raw = opts[0].step.__wrapped__.__wrapped__
    assert not hasattr(raw, "__wrapped__")
    compiled = torch.compile(lambda: raw(opts[0]), fullgraph=True, backend="aot_eager")
    for step in range(3):
        _set_grads(models, step)
        with torch.no_grad():
            compiled()
        opts[1].step()
    _assert_equal_runs(models[0], opts[0], models[1], opts[1])


def test_compiled_train_step_with_inductor_equals_eager():
    torch._dynamo.reset()
    models = [_model(), _model()]
    opts = [fused_optim.AdamW(m.parameters(), lr=torch.tensor(0.01)) for m in models]

    def train_step(model, opt, x):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(train_step)
    for step in range(3):
        torch.manual_seed(step)
        x = torch.randn(4, 7)
        compiled(models[0], opts[0], x)
        train_step(models[1], opts[1], x)
    _assert_equal_runs(models[0], opts[0], models[1], opts[1], exact=False)


def _state_tensors(opt):
    return [t for state in opt.state.values() for name, t in state.items() if name != "step"]


@pytest.mark.parametrize("name", ["SGD", "Adagrad", "RMSprop", "Adam"])
def test_compiled_step_after_packed_state_updates_it_in_place(name):
    # State made eagerly (Adagrad's at construction, the others' by an eager
    # step) is packed: views of one buffer (Note [state arena]). As graph
    # inputs they alias, and Inductor cloned all but one of them before the
    # op and copied them back after, in every compiled step. The traced step
    # unpacks them as it is traced: the compiled step is the op alone, no
    # kernel of Inductor's, the same bits as eager.
    import torch._inductor.config
    import torch._inductor.metrics

    torch._dynamo.reset()
    models = [_model(), _model()]
    kwargs = {"momentum": 0.9} if name == "SGD" else {}
    opts = [getattr(fused_optim, name)(m.parameters(), lr=0.01, **kwargs) for m in models]
    _set_grads(models, 0)
    for opt in opts:
        opt.step()
    packed = _state_tensors(opts[0])
    assert len({t.untyped_storage().data_ptr() for t in packed}) < len(packed)
    torch._inductor.metrics.reset()
    with torch._inductor.config.patch(force_disable_caches=True):  # (a cached graph counts none)
        compiled = torch.compile(opts[0].step)
        for step in range(1, 4):
            _set_grads(models, step)
            compiled()
            opts[1].step()
    assert torch._inductor.metrics.generated_kernel_count == 0
    unpacked = _state_tensors(opts[0])
    assert len({t.untyped_storage().data_ptr() for t in unpacked}) == len(unpacked)
    _assert_equal_runs(models[0], opts[0], models[1], opts[1])


def test_eager_step_keeps_the_fast_call(monkeypatch):
    def refuse(call):
        raise AssertionError("eager step went through torch.ops")

    monkeypatch.setattr(_ops, "call_public", refuse)
    model = _model()
    opt = fused_optim.Adam(model.parameters(), lr=0.01)
    _set_grads([model], 0)
    opt.step()


# ----- every keyword combination -----------------------------------------------------------

# Where torch refuses only because its own foreach / single-tensor code
# cannot do something that our fused step does, we accept (documented in
# Note [implementation keywords]); these are those refusals.
OURS_BETTER = (
    (AssertionError, "If capturable=True, params and state_steps must be on supported devices"),
    (AssertionError, "If capturable=True, params, mu_products"),  # (NAdam's wording)
)


def _keyword_combinations():
    import inspect
    import itertools

    for name in IN_TORCH:
        signature = inspect.signature(getattr(torch.optim, name)).parameters
        axes = {"foreach": [None, True, False], "differentiable": [False, True]}
        for keyword, values in (("fused", [None, True, False]), ("capturable", [False, True])):
            if keyword in signature:
                axes[keyword] = values
        axes["lr"] = [0.01, "tensor"]
        for values in itertools.product(*axes.values()):
            yield name, dict(zip(axes, values))


def _outcome(cls, kwargs):
    torch.manual_seed(0)
    params = [torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)]
    kwargs = dict(kwargs)
    if kwargs["lr"] == "tensor":
        kwargs["lr"] = torch.tensor(0.01)
    try:
        opt = cls(params, **kwargs)
    except Exception as error:  # noqa: BLE001 (any type: compared with torch's)
        return "constructor", error
    try:
        for step in range(2):
            for p in params:
                p.grad = torch.full_like(p, 0.5 + step)
            opt.step()
    except Exception as error:  # noqa: BLE001
        return "step", error
    return "ok", [p.detach().clone() for p in params]


@pytest.mark.parametrize("name,kwargs", list(_keyword_combinations()),
                         ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={v}" for k, v in v.items()))
def test_keyword_combination_as_torch(name, kwargs):
    # Every combination torch accepts, we accept, with its results; every
    # one it refuses we refuse with its exception type, at the same point
    # (constructor or step), except OURS_BETTER.
    (where_ref, ref), (where, ours) = (
        _outcome(getattr(torch.optim, name), kwargs),
        _outcome(getattr(fused_optim, name), kwargs),
    )
    if where_ref == "ok":
        assert where == "ok", ours
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b)
    elif (where, type(ours)) == (where_ref, type(ref)):
        pass  # refused alike
    elif (kwargs.get("fused") is not False and not kwargs["differentiable"]
          and any(isinstance(ref, t) and text in str(ref) for t, text in OURS_BETTER)):
        # (with fused=False or differentiable=True we run torch's code,
        # which refuses as torch does)
        assert where == "ok", ours
        plain = {k: v for k, v in kwargs.items() if k not in ("foreach", "capturable")}
        (_, same) = _outcome(getattr(fused_optim, name), plain)
        for a, b in zip(ours, same):
            assert torch.equal(a, b)
    else:
        raise AssertionError(f"torch: {where_ref} {ref!r}; ours: {where} {ours!r}")


def _bf16_params():
    return [torch.randn(5, 3, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(7, dtype=torch.bfloat16, requires_grad=True)]


def _fp32_params():
    return [torch.randn(5, 3, requires_grad=True), torch.randn(7, requires_grad=True)]


def _complex_params():
    return [torch.randn(5, 3, dtype=torch.complex64, requires_grad=True),
            torch.randn(7, requires_grad=True)]


COMPILED_VARIANTS = {
    "adamw_master_weights": (fused_optim.AdamW, dict(master_weights=True), _bf16_params, False),
    "adamw_stochastic_rounding": (fused_optim.AdamW, dict(stochastic_rounding=True),
                                  _bf16_params, False),
    "sgd_momentum_master_weights": (fused_optim.SGD, dict(momentum=0.9, master_weights=True),
                                    _bf16_params, False),
    "adam_bf16_state": (fused_optim.Adam, dict(state_dtype=torch.bfloat16), _fp32_params, False),
    "adam_complex": (fused_optim.Adam, {}, _complex_params, False),
    "sgd_momentum_complex": (fused_optim.SGD, dict(momentum=0.9), _complex_params, False),
    "adam_unfused": (fused_optim.Adam, dict(fused=False), _fp32_params, False),
    "rmsprop_amp": (fused_optim.RMSprop, dict(momentum=0.5), _fp32_params, True),
    "adagrad_amp": (fused_optim.Adagrad, {}, _fp32_params, True),
}


@pytest.mark.parametrize("variant", sorted(COMPILED_VARIANTS))
def test_compiled_step_variants_equal_eager(variant):
    # Precision options, complex params, unfused groups and AMP's
    # grad_scale / found_inf under torch.compile: the same bits as eager.
    cls, kwargs, make, amp = COMPILED_VARIANTS[variant]
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = make()
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opts = [cls(ps, lr=0.01, **kwargs) for ps in (ours, ref)]
    compiled = torch.compile(opts[0].step, backend="aot_eager")
    for step in range(4):
        _same_grads(ours, ref, step)
        if amp:
            for opt in opts:
                opt.grad_scale = torch.tensor(4.0)
                opt.found_inf = torch.tensor(1.0 if step == 2 else 0.0)
        compiled()
        opts[1].step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q), variant
    _assert_equal_runs_params_state(opts[0], opts[1])


@pytest.mark.parametrize("cls, kwargs", [(fused_optim.Adam, {}),
                                         (fused_optim.SGD, dict(momentum=0.9)),
                                         (fused_optim.Lamb, {})], ids=["adam", "sgd", "lamb"])
def test_compiled_step_with_complex_groups_between_others(cls, kwargs):
    # Calls with complex params run eagerly inside the compiled step; with
    # that graph break between two groups' calls, the call after it
    # updated the params of the call before it (SGD: the complex param
    # took both groups' steps, the float one none).
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, dtype=torch.complex64, requires_grad=True),
            torch.randn(7, requires_grad=True), torch.randn(4, dtype=torch.complex128,
                                                            requires_grad=True),
            torch.randn(6, dtype=torch.float64, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opts = [cls([{"params": ps[:1], "lr": 0.01}, {"params": ps[1:2], "lr": 0.5},
                 {"params": ps[2:3], "lr": 0.1}, {"params": ps[3:], "lr": 0.2}], **kwargs)
            for ps in (ours, ref)]
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=3)


@pytest.mark.parametrize("complex_params", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("cls, kwargs", [(fused_optim.SGD, dict(momentum=0.9)),
                                         (fused_optim.Adam, {}),
                                         (fused_optim.RMSprop, dict(momentum=0.5)),
                                         (fused_optim.Adagrad, {})],
                         ids=["sgd", "adam", "rmsprop", "adagrad"])
def test_compiled_step_with_an_unfused_group_before_fused_ones(cls, kwargs, complex_params):
    # torch's code for the fused=False group runs eagerly in the compiled
    # step (a graph break). Run before the fused calls, that break came
    # between the state a fused call makes for its new params and the
    # call: SGD's call then got the first param's new momentum buffer for
    # the second param too and refused it.
    torch._dynamo.reset()
    torch.manual_seed(0)
    dtype = torch.complex64 if complex_params else torch.float32
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True),
            torch.randn(33, requires_grad=True), torch.randn(6, dtype=dtype, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opts = [cls([{"params": ps[:1], "fused": False}, {"params": ps[1:3], "lr": 0.05},
                 {"params": ps[3:], "lr": 0.02}], lr=0.1, **kwargs)
            for ps in (ours, ref)]
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=3)


@pytest.mark.parametrize("count", [1, 2])
@pytest.mark.parametrize("config", ONE_PER_OPTIMIZER, ids=lambda c: c.name)
def test_compiled_step_with_only_complex_params_equals_eager(config, count):
    # With no real param, the step's only calls are the eager complex ones
    # after the graph break: the state the first step made must still be
    # stored where Dynamo guards on it, or every later step replays the
    # first step's graph (SGD's momentum restarted from each gradient; seen
    # with one param, where no other guard happened to cover it).
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, dtype=torch.complex64, requires_grad=True),
            torch.randn(7, dtype=torch.complex64, requires_grad=True)][:count]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    cls = getattr(fused_optim, config.name)
    opts = [cls(ps, **config.kwargs) for ps in (ours, ref)]
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=4)


@pytest.mark.parametrize("name", ["Adam", "SGD", "Lamb"])
def test_compiled_step_refused_in_a_later_group_makes_no_state(name):
    # Every group's params and gradients are checked before the first
    # group's state is made (Adam's and Lamb's is stored at once, SGD's
    # momentum buffer after its call): the refused first step leaves none,
    # and the step after it is the first step eager takes.
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    kwargs = dict(momentum=0.9) if name == "SGD" else {}
    opts = [getattr(fused_optim, name)([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.01,
                                       **kwargs) for ps in (ours, ref)]
    compiled = torch.compile(opts[0].step, backend="eager")
    _same_grads(ours, ref, 0)
    ours[1].grad = ours[1].grad.to_sparse()
    before = snapshot_optimizer(opts[0])
    with pytest.raises(RuntimeError, match="sparse gradients are not supported under torch.compile"):
        compiled()
    assert_optimizer_unchanged(opts[0], before, "refused compiled step")
    assert len(opts[0].state) == 0
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=3)


def _fresh_params_and_copies():
    """Three params and equal copies, Dynamo's caches cleared."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True),
            torch.randn(6, requires_grad=True)]
    return ours, [p.detach().clone().requires_grad_() for p in ours]


@pytest.mark.parametrize("with_fused_group", [False, True], ids=["alone", "after-a-fused-group"])
def test_compiled_step_refused_in_a_torch_path_group_writes_nothing(with_fused_group):
    # A fused=False group is stepped by torch's code, last (torch's Adam
    # makes the state of the params before a sparse gradient, then raises);
    # it is checked first, as an eager step checks it: nothing is written.
    ours, ref = _fresh_params_and_copies()

    def groups(ps):
        unfused = {"params": ps[1:], "fused": False}
        return [{"params": ps[:1]}, unfused] if with_fused_group else [unfused]

    opts = [fused_optim.Adam(groups(ps), lr=0.01) for ps in (ours, ref)]
    compiled = torch.compile(opts[0].step, backend="eager")
    _same_grads(ours, ref, 0)
    ours[2].grad = ours[2].grad.to_sparse()
    before = snapshot_optimizer(opts[0])
    params_before = [p.detach().clone() for p in ours]
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        compiled()
    assert_optimizer_unchanged(opts[0], before, "refused compiled step")
    assert len(opts[0].state) == 0
    assert all(torch.equal(p, q) for p, q in zip(ours, params_before))
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=3)


def _master_weights_in_torch_path_group(opt, params):
    opt.param_groups[1]["master_weights"] = True


def _sparse_gradient_in_torch_path_group(opt, params):
    params[2].grad = params[2].grad.to_sparse()


def _lr_of_two_elements(opt, params):
    opt.param_groups[1]["lr"] = torch.tensor([0.01, 0.02])


LATER_CHANGES = {
    "master_weights": (_master_weights_in_torch_path_group, ValueError, "need\\(s\\) the fused step"),
    "sparse_gradient": (_sparse_gradient_in_torch_path_group, RuntimeError,
                        "does not support sparse gradients"),
    "lr_of_two_elements": (_lr_of_two_elements, ValueError, "Tensor lr must be 1-element"),
}


@pytest.mark.parametrize("change", sorted(LATER_CHANGES))
def test_compiled_step_checks_a_torch_path_group_every_step(change):
    # What the torch-path group's checks read is not all guarded by Dynamo
    # (a gradient's layout, a precision option): checked once, as the step
    # was traced, a change made later was refused by torch's code after
    # the fused group was written. Checked at every step, it is refused
    # first; undone, the compiled step goes on as eager.
    ours, ref = _fresh_params_and_copies()
    opts = [fused_optim.Adam([{"params": ps[:1]}, {"params": ps[1:], "fused": False}], lr=0.01)
            for ps in (ours, ref)]
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=2)
    group_before = dict(opts[0].param_groups[1])
    change_group, error, match = LATER_CHANGES[change]
    _same_grads(ours, ref, 2)
    change_group(opts[0], ours)
    before = snapshot_optimizer(opts[0])
    with pytest.raises(error, match=match):
        torch.compile(opts[0].step, backend="eager")()
    assert_optimizer_unchanged(opts[0], before, f"compiled step refused after {change}")
    opts[0].param_groups[1].clear()
    opts[0].param_groups[1].update(group_before)
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=2)


def test_compiled_step_refuses_an_lr_of_two_elements_in_a_later_group():
    # The lr tensor is a graph input: its new size retraces the step, and
    # the checks made as it is traced refuse it before anything runs.
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opts = [fused_optim.Adam([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.01)
            for ps in (ours, ref)]
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=2)
    opts[0].param_groups[1]["lr"] = torch.tensor([0.01, 0.02])
    _same_grads(ours, ref, 2)
    before = snapshot_optimizer(opts[0])
    # (raised in _init_group, which Dynamo wraps as it wraps torch's own)
    with pytest.raises((ValueError, RuntimeError), match="param group 1 has an lr tensor"):
        torch.compile(opts[0].step, backend="eager")()
    assert_optimizer_unchanged(opts[0], before, "compiled step with an lr of two elements")


@pytest.mark.parametrize("option, value", [("master_weights", True),
                                           ("state_dtype", torch.float32),
                                           ("stochastic_rounding", True)])
def test_compiled_step_follows_precision_options_changed_later(option, value):
    # The precision options are read by _init_group, which Dynamo runs
    # without tracing: a change made after the step was compiled went
    # unseen (no master copy made, the graph's old storage kept). Read in
    # the traced code, a change retraces the step, which then applies it
    # as the eager step does.
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, dtype=torch.bfloat16, requires_grad=True),
            torch.randn(33, dtype=torch.bfloat16, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opts = [fused_optim.Adam(ps, lr=0.01) for ps in (ours, ref)]
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=2)
    for opt in opts:
        opt.param_groups[0][option] = value
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=3)
    if option == "master_weights":
        assert "master_param" in opts[0].state[ours[1]]
    else:
        state_dtype = torch.float32 if option == "state_dtype" else torch.bfloat16
        assert opts[0].state[ours[1]]["exp_avg"].dtype == state_dtype


@pytest.mark.parametrize("cls, kwargs", [(fused_optim.AdamW, {}),
                                         (fused_optim.SGD, dict(momentum=0.9)),
                                         (fused_optim.Lion, {})], ids=["adamw", "sgd", "lion"])
def test_compiled_step_rounds_stochastically_as_eager_across_groups(cls, kwargs):
    # Eager puts the bf16 params of both groups in one call, the compiled
    # step makes one call per group; a param's random stream is named by
    # its group and its position there (rounding_ids), so both draw the
    # same bits, also at steps where a param has no gradient (which moves
    # the others of its call).
    torch._dynamo.reset()
    torch.manual_seed(0)
    shapes = [(5, 3), (33,), (4099,), (7,)]
    ours = [torch.randn(s, dtype=torch.bfloat16, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opts = [cls([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.03}], lr=0.01,
                stochastic_rounding=True, **kwargs) for ps in (ours, ref)]
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=5,
                                       with_grads=[None, (1, 2, 3), None, (0, 1, 3), None])


@pytest.mark.parametrize("last_group", [dict(momentum=0.9, master_weights=True),
                                        dict(stochastic_rounding=True)],
                         ids=["master_weights", "counter_only"])
def test_compiled_step_keeps_state_made_for_every_group(last_group):
    # The second group's new momentum buffers are stored by the traced
    # code after its call; Dynamo sees the state as the first _init_group
    # call left it (the first group, plain SGD, has none), so with one call
    # per group that store dropped the state the last group's call had
    # made: the master copy (remade from the bf16 param next step) or the
    # rounding counter (counted from 0 again).
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = [torch.randn(s, dtype=torch.bfloat16, requires_grad=True)
            for s in [(5, 3), (33,), (4099,), (7,), (9,)]]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opts = [fused_optim.SGD([{"params": ps[:1]}, {"params": ps[1:3], "momentum": 0.9},
                             {"params": ps[3:], **last_group}], lr=0.01) for ps in (ours, ref)]
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=1)
    for p, q in zip(ours[1:], ref[1:]):
        assert opts[0].state[p].keys() == opts[1].state[q].keys() != set()
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=3)


def test_compiled_step_whose_complex_call_fails_makes_no_state(monkeypatch):
    # The complex calls' state is stored before they run (above); a call
    # that raises takes it back: the failed first step leaves no state, and
    # the next step is the first step eager takes.
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours = [torch.randn(5, 3, dtype=torch.complex64, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opts = [fused_optim.SGD(ps, lr=0.1, momentum=0.9) for ps in (ours, ref)]
    compiled = torch.compile(opts[0].step, backend="eager")
    _same_grads(ours, ref, 0)
    before = snapshot_optimizer(opts[0])

    def refuse(call):
        raise RuntimeError("refused for the test")

    with monkeypatch.context() as patch:
        patch.setattr(_ops, "call_public", refuse)
        with pytest.raises(RuntimeError, match="refused for the test"):
            compiled()
    assert_optimizer_unchanged(opts[0], before, "failed compiled step")
    assert len(opts[0].state) == 0
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=3)


def _count_eager_fallbacks(monkeypatch) -> list:
    """A list that gets an entry at each step run by the eager fallback of
    Note [a step Dynamo runs eagerly] (_traced.py)."""
    calls, real = [], TracedStep._eager_step_without_dynamo
    monkeypatch.setattr(TracedStep, "_eager_step_without_dynamo",
                        lambda self: calls.append(1) or real(self))
    return calls


# (no param with a gradient, then each alone, two of them of one shape)
GRADS_AFTER_AN_EMPTY_STEP = [(), (0, 1, 2), (0,), (1,), (2,), (1, 0), (2,)]


def _params_of_two_shapes(dtype=torch.float32):
    torch.manual_seed(0)
    ours = [torch.randn(s, dtype=dtype, requires_grad=True) for s in ((4, 5), (4, 5), (33,))]
    return ours, [p.detach().clone().requires_grad_() for p in ours]


@pytest.mark.parametrize("config", ONE_PER_OPTIMIZER, ids=lambda c: c.name)
def test_compiled_step_after_a_step_without_gradients(config, monkeypatch):
    # Note [a step Dynamo runs eagerly] (_traced.py): traced with no
    # gradient, the step's frame held no op, and Dynamo ran it eagerly
    # ever after, compiling the functions it calls one by one: a param's
    # state lookup, replayed for another param, gave Adam the first
    # param's moments for the next (refused where the shapes differed,
    # silently used where not). The step must stay traced, and equal eager.
    torch._dynamo.reset()
    fallbacks = _count_eager_fallbacks(monkeypatch)
    ours, ref = _params_of_two_shapes()
    opts = [config.ours_cls(ps, **config.kwargs) for ps in (ours, ref)]
    _assert_compiled_steps_equal_eager(opts, ours, ref, steps=len(GRADS_AFTER_AN_EMPTY_STEP),
                                       with_grads=GRADS_AFTER_AN_EMPTY_STEP)
    assert not fallbacks


@pytest.mark.parametrize("closure", [False, True], ids=["step", "step_with_closure"])
def test_compiled_step_past_the_recompile_limit(closure, monkeypatch):
    # Note [a step Dynamo runs eagerly]: past its recompile limit Dynamo
    # runs a frame eagerly (each set of params with gradients is a
    # recompile): the step's, or, after a graph break in the closure, the
    # one resumed after it. Either runs the eager step, equal to it.
    torch._dynamo.reset()
    fallbacks = _count_eager_fallbacks(monkeypatch)
    ours, ref = _params_of_two_shapes(torch.bfloat16)
    opts = [fused_optim.AdamW(ps, lr=0.01, master_weights=True) for ps in (ours, ref)]
    compiled = torch.compile(opts[0].step, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        _step_both_with_grads_of(compiled, opts[1].step, ours, ref, closure)
    _assert_equal_runs_params_state(opts[0], opts[1])
    assert fallbacks


def test_compiled_step_in_frames_dynamo_skips(monkeypatch):
    # Note [a step Dynamo runs eagerly]: the frames Dynamo skips (as it
    # does those whose trace broke in a loop) run eagerly, and Dynamo
    # compiles the functions they call one by one: the step, run eagerly,
    # compiles none of its helpers.
    fallbacks = _count_eager_fallbacks(monkeypatch)
    ours, ref = _params_of_two_shapes(torch.bfloat16)
    opts = [fused_optim.Adam(ps, lr=0.01, master_weights=True) for ps in (ours, ref)]
    graphs = _compiled_steps_with_frames_skipped(
        opts, ours, ref, [StepProtocol._traced_step_with_closure, TracedStep._traced_step],
        closure=False)
    assert len(fallbacks) == len(GRADS_AFTER_AN_EMPTY_STEP)
    assert graphs == []


@pytest.mark.parametrize("closure", [False, True], ids=["no_closure", "closure"])
def test_compiled_step_whose_closure_frame_dynamo_skips(monkeypatch, closure):
    # Where Dynamo skips only the frame that runs the closure and the
    # checks (_traced_step_with_closure), it compiles the functions that
    # frame calls one by one: the checks of the group torch's code steps
    # (fused=False) still run eagerly, and _traced_step is traced as a
    # frame of its own (not the eager fallback): the steps equal eager.
    fallbacks = _count_eager_fallbacks(monkeypatch)
    ours, ref = _params_of_two_shapes()
    opts = [fused_optim.Adam([{"params": ps[:2]}, {"params": ps[2:], "fused": False}], lr=0.01)
            for ps in (ours, ref)]
    graphs = _compiled_steps_with_frames_skipped(
        opts, ours, ref, [StepProtocol._traced_step_with_closure], closure=closure)
    assert fallbacks == [] and graphs


def _compiled_steps_with_frames_skipped(opts, ours, ref, functions, closure) -> list:
    """Steps ``opts[0]`` compiled, with Dynamo told to skip the frames of
    ``functions`` (as it skips a frame whose trace broke in a loop), and
    ``opts[1]`` eager (_step_both_with_grads_of); asserts equal params and
    state; returns the graphs Dynamo made."""
    from torch._dynamo.eval_frame import set_code_exec_strategy, skip_code
    from torch._dynamo.types import FrameAction, FrameExecStrategy

    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph

    torch._dynamo.reset()
    codes = [f.__code__ for f in functions]
    for code in codes:
        skip_code(code)
    try:
        _step_both_with_grads_of(torch.compile(opts[0].step, backend=backend), opts[1].step,
                                 ours, ref, closure=closure)
    finally:
        for code in codes:
            set_code_exec_strategy(code, FrameExecStrategy(FrameAction.DEFAULT, FrameAction.DEFAULT))
        torch._dynamo.reset()
    _assert_equal_runs_params_state(opts[0], opts[1])
    return graphs


def _step_both_with_grads_of(compiled, eager, ours, ref, closure):
    """Steps ``compiled`` and ``eager`` with the gradients of
    GRADS_AFTER_AN_EMPTY_STEP, set by a closure where ``closure`` (a graph
    break after them): params equal after each step."""
    for step, with_grads in enumerate(GRADS_AFTER_AN_EMPTY_STEP):
        def set_grads(params, step=step, with_grads=with_grads):
            for i, p in enumerate(params):
                torch.manual_seed(10 * step + i)
                p.grad = torch.randn_like(p) if i in with_grads else None
            torch._dynamo.graph_break()
            return torch.zeros(())
        if closure:
            compiled(lambda: set_grads(ours))
            eager(lambda: set_grads(ref))
        else:
            set_grads(ours)
            set_grads(ref)
            compiled()
            eager()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), f"step {step}"


def _assert_compiled_steps_equal_eager(opts, ours, ref, steps, with_grads=None):
    """``steps`` steps of ``opts[0]`` compiled and ``opts[1]`` eager, on the
    same gradients: params equal after each, state at the end. With
    ``with_grads`` (a list, one entry per step): the indices of the params
    given a gradient at that step, or None for all."""
    compiled = torch.compile(opts[0].step, backend="eager")
    for step in range(steps):
        _same_grads(ours, ref, step)
        if with_grads is not None and with_grads[step] is not None:
            for i in set(range(len(ours))) - set(with_grads[step]):
                ours[i].grad = ref[i].grad = None
        compiled()
        opts[1].step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), f"step {step}"
    _assert_equal_runs_params_state(opts[0], opts[1])


def _same_grads(ours, ref, step):
    for i, (p, q) in enumerate(zip(ours, ref)):
        torch.manual_seed(10 * step + i)
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()


def _assert_equal_runs_params_state(opt_a, opt_b):
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for n in sa[k]:
            assert torch.equal(sa[k][n], sb[k][n]), f"state[{k}][{n}]"


def test_loading_keeps_our_implementation_keywords(monkeypatch):
    # Note [implementation keywords on load]: a torch checkpoint saved with
    # fused=False (and foreach=False) loads its state and hyperparameters,
    # not its implementation choice: the step stays our fused call.
    models = [_model(), _model()]
    ref = torch.optim.AdamW(models[0].parameters(), lr=0.02, fused=False, foreach=False)
    _set_grads([models[0]], 0)
    ref.step()
    ours = fused_optim.AdamW(models[1].parameters(), lr=0.01)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # (a load aliases tensors)
    group = ours.param_groups[0]
    assert (group["fused"], group["foreach"], group["lr"]) == (None, None, 0.02)
    calls = []
    real = _ops.fast_function
    monkeypatch.setattr(_ops, "fast_function",
                        lambda call: calls.append(call.name) or real(call))
    with torch.no_grad():
        for p, q in zip(models[1].parameters(), models[0].parameters()):
            p.copy_(q)
    _set_grads(models, 1)
    ours.step()
    ref.step()
    assert calls == ["adam_"]
    _assert_equal_runs(models[1], ours, models[0], ref, exact=False)


def test_the_rest_of_torch_optim_is_torchs_own():
    # Note [the rest of torch.optim] (fused_optim/__init__.py): `import
    # fused_optim as optim` in place of `import torch.optim as optim` keeps
    # the schedulers, SWA and torch's other optimizers, as torch's objects.
    import fused_optim as optim
    from fused_optim.lr_scheduler import StepLR
    from fused_optim.swa_utils import AveragedModel

    assert optim.lr_scheduler is torch.optim.lr_scheduler
    assert StepLR is torch.optim.lr_scheduler.StepLR
    assert AveragedModel is torch.optim.swa_utils.AveragedModel
    assert optim.Optimizer is torch.optim.Optimizer
    for name in torch.optim.__all__:
        if name in fused_optim.__all__:
            assert getattr(optim, name) is not getattr(torch.optim, name), name  # ours
        else:
            assert getattr(optim, name) is getattr(torch.optim, name), name
        assert name in dir(optim), name
    with pytest.raises(AttributeError, match="module 'fused_optim' has no attribute 'Adamw'"):
        optim.Adamw  # noqa: B018
    # (the MNIST example's lines, with our module in torch.optim's place)
    model = _model()
    opt = optim.Adadelta(model.parameters(), lr=1.0)
    schedule = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    model(torch.randn(4, 7)).sum().backward()
    opt.step()
    schedule.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.7)
