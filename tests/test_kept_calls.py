"""The kept op call of a one-call step (Note [repeated call] in
fused_optim/_kept_calls.py): whatever changes between steps -- any group
option, in place or replaced, a tensor option changed in place, a state
tensor or step counter replaced -- takes effect at the next step exactly as
in torch.optim, and the call is really kept while nothing changes."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.testing import assert_close

import fused_optim
from fused_optim import _group_options
from harness import assert_optimizer_unchanged, assert_same_state, snapshot_optimizer, torch_clip_
from optim_configs import GROUP_OVERRIDES, NOT_IN_TORCH, OPTIMIZER_NAMES, torch_class

# (sizes: a vector body and a tail)
SIZES = ((37,), (8, 5), (130,))


def _pair(name):
    """Ours and the reference over the same three groups: GROUP_OVERRIDES
    without the options that select a kernel, so that every param is in
    one bucket (one call)."""
    torch.manual_seed(0)
    initial = [torch.randn(*s, dtype=torch.float64).float() for s in SIZES]
    mode_keys = getattr(fused_optim, name)._mode_keys
    overrides = [{k: v for k, v in o.items() if k not in mode_keys} for o in GROUP_OVERRIDES[name]]
    runs = []
    for cls, extra in ((getattr(fused_optim, name), {}), (torch_class(name), {"foreach": False})):
        params = [torch.nn.Parameter(t.clone()) for t in initial]
        groups = [{"params": [params[0]]}] + [
            {"params": [p], **o} for p, o in zip(params[1:], overrides)
        ]
        if name not in NOT_IN_TORCH:  # (no foreach keyword there)
            groups = [{**g, **extra} for g in groups]
        runs.append((cls(groups, lr=0.01), params))
    return runs


def _warm(name, reference=False):
    """Ours (or the reference) after three steps, the call kept."""
    opt, params = _pair(name)[1 if reference else 0]
    for step in range(3):
        _set_grads(params, step)
        opt.step()
    return opt, params


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def _replace_state_tensors(opt, step_counters: bool) -> None:
    for state in opt.state.values():
        for key in list(state):
            if isinstance(state[key], torch.Tensor) and (key == "step") == step_counters:
                state[key] = state[key].clone()


def _change(step, opt):
    """Something different before each step, the same on both sides."""
    groups = opt.param_groups
    if step in (1, 10):
        _replace_state_tensors(opt, step_counters=False)  # (the kept call must read them)
    elif step == 2:
        _replace_state_tensors(opt, step_counters=True)
    elif step == 3:
        for g in groups:
            g["lr"] = g["lr"] * 0.5  # a float replaced (every scheduler)
    elif step == 4:
        groups[1]["weight_decay"] = 0.05  # a hyperparameter replaced
    elif step == 5 and "betas" in groups[0]:
        groups[0]["betas"] = list(groups[0]["betas"])  # a list option...
    elif step == 6 and "betas" in groups[0]:
        groups[0]["betas"][0] = 0.7  # ...changed in place
    elif step == 7:
        groups[2]["lr"] = torch.tensor(groups[2]["lr"])  # a tensor option...
    elif step == 8:
        groups[2]["lr"].fill_(0.004)  # ...changed in place
    elif step == 9:
        groups[2]["lr"] = 0.003  # a float again: the call is kept again
    elif step == 11:
        groups[0]["weight_decay"] = 0.02


def _step_both(runs, name: str, steps: int, change) -> None:
    """Steps ours and the reference (``runs``: [(ours, params), (reference,
    params)]) ``steps`` times, ``change(step, opt)`` applied to both before
    each step; asserts their params and state equal after every step."""
    (ours, ours_params), (ref, ref_params) = runs
    for step in range(steps):
        for opt, params in runs:
            change(step, opt)
            _set_grads(params, step)
            opt.step()
        for i, (a, b) in enumerate(zip(ours_params, ref_params)):
            where = f"{name} step {step} param {i}"
            assert_close(a.detach(), b.detach(), msg=lambda m: f"{where}: {m}")
            assert_same_state(ours.state[a], ref.state[b], where)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_change_between_steps_takes_effect_as_in_torch(name):
    runs = _pair(name)
    _step_both(runs, name, 12, _change)
    ours = runs[0][0]
    assert len(ours._plan.buckets) == 1 and ours._plan.kept_calls is not None  # (what ran)


def _spy(monkeypatch, opt):
    """Counts of the group reads and call builds of ``opt``'s steps."""
    counts = {"group_arguments": 0, "op_call": 0}
    for method in counts:
        real = getattr(opt, "_" + method)

        def counting(*args, _real=real, _method=method, **kwargs):
            counts[_method] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(opt, "_" + method, counting)
    return counts


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_the_call_is_kept_while_no_option_but_lr_changes(name, monkeypatch):
    opt, params = _pair(name)[0]
    _set_grads(params, 0)
    opt.step()
    counts = _spy(monkeypatch, opt)
    for step in range(1, 4):
        _set_grads(params, step)
        opt.param_groups[1]["lr"] = 0.01 * step  # (a scheduler: lr is read every step)
        opt.step()
    opt.param_groups[2]["lr"] = torch.tensor(0.02)  # (read with .item(), every step)
    opt.step()
    assert counts == {"group_arguments": 0, "op_call": 0}
    opt.param_groups[1]["weight_decay"] = 0.02  # another option: the group arguments again
    opt.step()
    assert counts == {"group_arguments": 1, "op_call": 1}
    opt.step()
    assert counts == {"group_arguments": 1, "op_call": 1}
    opt.param_groups[1]["weight_decay"] = torch.tensor(0.02)  # read every step from now on
    opt.step()
    opt.step()
    assert counts == {"group_arguments": 3, "op_call": 3}


def test_group_options_see_a_replaced_option_even_when_it_compares_equal():
    params = [torch.nn.Parameter(torch.randn(2))]
    group = {"params": params, "lr": 0.1, "betas": [0.9, 0.99], "state_dtype": torch.bfloat16,
             "name": "decay", "max_grad_norm": None, "eps": (1e-8,), "weight_decay": 0.0}
    options = _group_options.GroupOptions([group])
    assert options.kept and options.unchanged([group])
    params.append(torch.nn.Parameter(torch.randn(2)))
    assert options.unchanged([group])  # (the plan checks the params)
    for lr in (0.2, torch.tensor(0.1)):
        assert options.unchanged([{**group, "lr": lr}])  # (lr is read every step)
    for key, value in (("weight_decay", torch.tensor(0.0)), ("weight_decay", 0.0 + 0.0j),
                       ("eps", tuple([1e-8])), ("name", "no_decay")):
        assert not options.unchanged([{**group, key: value}]), key
    group["betas"][0] = float("0.9")  # (an equal float, another object)
    assert not options.unchanged([group])  # (the list's item replaced, in place)
    assert not options.unchanged([group, group])
    for unseen in (torch.tensor(0.1), [torch.tensor(0.9)], (torch.tensor(0.9), 0.99), {"a": 1}):
        options = _group_options.GroupOptions([{**group, "weight_decay": unseen}])
        assert not options.kept and not options.unchanged([{**group, "weight_decay": unseen}])
    assert _group_options.GroupOptions([{**group, "lr": torch.tensor(0.1)}]).kept


def test_group_options_read_each_option_by_name():
    params = [torch.nn.Parameter(torch.randn(2))]
    group = {"params": params, "lr": 0.1, "momentum": 0.0, "dampening": 0.0, "nesterov": False}
    options = _group_options.GroupOptions([group])
    moved = dict(group)
    moved["lr"] = moved.pop("lr")  # (lr now last: the others read by name, unchanged)
    assert options.unchanged([moved])
    renamed = dict(group)
    renamed["maximize"] = renamed.pop("nesterov")  # (the same object under another key)
    assert not options.unchanged([renamed])
    added = {**group, "maximize": False}
    assert not options.unchanged([added])
    assert not options.unchanged([{k: v for k, v in group.items() if k != "nesterov"}])
    assert not options.unchanged([])
    # a group of params and lr alone: one option read (a 1-tuple, not the list)
    bare = {"params": params, "lr": 0.1}
    options = _group_options.GroupOptions([bare, group])
    assert options.values[0] is params and options.unchanged([bare, group])
    assert not options.unchanged([{"params": list(params), "lr": 0.1}, group])


def _torch_run(name, groups_of, changes, steps=8):
    """``steps`` steps of ours and of torch.optim from the same weights,
    ``changes[step](opt)`` applied to both before that step; asserts params
    and state equal after every step."""
    runs = []
    for cls, extra in ((getattr(fused_optim, name), {}), (torch_class(name), {"foreach": False})):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s)) for s in SIZES]
        runs.append((cls(groups_of(params), lr=0.01, **extra), params))
    _step_both(runs, name, steps, lambda step, opt: step in changes and changes[step](opt))
    return runs[0][0]


def _replace_state_dicts(opt):
    # (a param's whole state dict replaced: the plan holds the old one)
    for param in list(opt.state):
        opt.state[param] = {k: v.clone() * (0.5 if k != "step" else 1)
                            for k, v in opt.state[param].items()}


def _set_option(key, value):
    def change(opt):
        for group in opt.param_groups:
            group[key] = value
    return change


@pytest.mark.parametrize("name, changes", [
    ("SGD", {3: _set_option("nesterov", True), 5: _replace_state_dicts,
             6: _set_option("nesterov", False)}),
    ("Adam", {3: _replace_state_dicts, 5: _set_option("maximize", True)}),
    ("RMSprop", {3: _set_option("momentum", 0.0), 5: _replace_state_dicts}),
])
def test_changes_after_kept_steps_that_need_a_new_plan_take_effect_as_in_torch(name, changes):
    # A kernel mode flipped (the plan's buckets derive from it) or a state
    # dict replaced (the plan holds the old one), after steps whose plan
    # check found nothing changed and skipped the signatures.
    def groups_of(params):
        options = {"momentum": 0.9} if name in ("SGD", "RMSprop") else {}
        return [{"params": [p], **options} for p in params]

    opt = _torch_run(name, groups_of, changes)
    assert opt._plan.kept_calls is not None  # (the kept call ran after the changes)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_a_refused_call_after_kept_steps_changes_nothing(name):
    opt, params = _warm(name)
    snapshot = snapshot_optimizer(opt)
    params[1].grad.data = params[1].grad.double()  # (the grad setter would refuse it)
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()
    assert_optimizer_unchanged(opt, snapshot, f"{name} refused step")
    # and the next good step is the step torch takes
    ref, ref_params = _warm(name, reference=True)
    for p, r in zip(params, ref_params):
        p.grad = torch.randn(p.shape)
        r.grad = p.grad.clone()
    opt.step()
    ref.step()
    for a, b in zip(params, ref_params):
        assert_close(a.detach(), b.detach())
        assert_same_state(opt.state[a], ref.state[b], name)


def test_complex_params_over_kept_steps_match_torch():
    runs = []
    for cls in (fused_optim.Adam, torch.optim.Adam):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(33, dtype=torch.complex64)) for _ in range(2)]
        runs.append((cls(params, lr=0.01, foreach=False), params))
    for step in range(5):
        for opt, params in runs:
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=gen)
            opt.step()
    (ours, ours_params), (ref, ref_params) = runs
    for a, b in zip(ours_params, ref_params):
        assert_close(a.detach(), b.detach())
        assert_same_state(ours.state[a], ref.state[b], "complex")


PRECISIONS = {
    "bf16-master": (torch.bfloat16, dict(master_weights=True)),
    "bf16-state": (torch.float32, dict(state_dtype=torch.bfloat16)),
    "bf16-sr": (torch.bfloat16, dict(stochastic_rounding=True)),
    "clipped": (torch.float32, dict(max_grad_norm=0.5)),
}


def _assert_kept_equals_afresh(make, where: str, clipped: bool) -> None:
    """The same steps of ``make() -> (optimizer, params)``, once with the
    calls kept and once with them built anew each step (state tensors
    replaced between steps): params, state and the clipping norm equal bit
    for bit."""
    runs = []
    for keep in (True, False):
        opt, params = make()
        for step in range(6):
            if step == 3:
                _replace_state_tensors(opt, step_counters=False)
            _set_grads(params, step)
            torch.manual_seed(1000 + step)  # (stochastic rounding's draws)
            opt.step()
            if not keep and opt._plan is not None:
                opt._plan.kept_calls = None
        runs.append((opt, params))
    (kept, kept_params), (fresh, fresh_params) = runs
    for i, (a, b) in enumerate(zip(kept_params, fresh_params)):
        assert torch.equal(a, b), f"{where} param {i}"
        for key, value in fresh.state[b].items():
            assert torch.equal(kept.state[a][key], value), f"{where} {key} {i}"
    if clipped:
        assert torch.equal(kept.grad_norm, fresh.grad_norm)


@pytest.mark.parametrize("precision", sorted(PRECISIONS))
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_kept_call_is_the_call_built_afresh_bit_for_bit(name, precision):
    dtype, options = PRECISIONS[precision]

    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s).to(dtype)) for s in SIZES]
        return getattr(fused_optim, name)(params, lr=0.01, **options), params

    _assert_kept_equals_afresh(make, f"{name} {precision}", clipped=precision == "clipped")


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_the_kept_call_holds_no_gradient_or_replaced_state_after_the_step(name):
    # zero_grad(set_to_none=True) frees the gradients (a model's worth of
    # memory), and a state tensor replaced by the user is freed, as with
    # torch.optim: the kept call does not hold this step's tensors.
    opt, params = _warm(name)
    grads = [weakref.ref(p.grad) for p in params]
    replaced = [weakref.ref(t) for state in opt.state.values() for t in state.values()]
    _replace_state_tensors(opt, step_counters=False)
    _replace_state_tensors(opt, step_counters=True)
    opt.zero_grad(set_to_none=True)
    assert opt._plan.kept_calls.calls[0]._call is not None  # (kept)
    assert all(g() is None for g in grads)
    assert all(r() is None for r in replaced)


# ----- several kept calls (one per bucket) ----------------------------------------------


def _several_buckets(name, reference=False):
    """Ours (or the reference) over groups in several buckets: the groups
    with their kernel modes (GROUP_OVERRIDES) and one more of float64
    params (another dtype: another bucket for every optimizer)."""
    torch.manual_seed(0)
    initial = [torch.randn(*s, dtype=torch.float64) for s in SIZES + ((19,),)]
    params = [torch.nn.Parameter(t.clone() if i == len(SIZES) else t.float())
              for i, t in enumerate(initial)]
    groups = [{"params": [params[0]]}] + [
        {"params": [p], **o} for p, o in zip(params[1:], GROUP_OVERRIDES[name])
    ] + [{"params": params[len(GROUP_OVERRIDES[name]) + 1:]}]
    cls = torch_class(name) if reference else getattr(fused_optim, name)
    extra = {"foreach": False} if reference and name not in NOT_IN_TORCH else {}
    return cls(groups, lr=0.01, **extra), params


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_several_kept_calls_match_torch(name):
    runs = [_several_buckets(name), _several_buckets(name, reference=True)]
    _step_both(runs, name, 12, _change)
    ours = runs[0][0]
    kept = ours._plan.kept_calls
    assert len(ours._plan.buckets) > 1 and kept is not None  # (what ran)
    assert all(call._call is not None for call in kept.calls)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_a_call_refused_after_kept_steps_writes_no_bucket(name):
    # Several calls: each is validated before the first is made, so a call
    # refused in the last bucket leaves the others' params and state as
    # they were, and the step after it is torch's step.
    runs = [_several_buckets(name), _several_buckets(name, reference=True)]
    for step in range(3):
        for opt, params in runs:
            _set_grads(params, step)
            opt.step()
    (opt, params), (ref, ref_params) = runs
    assert len(opt._plan.kept_calls.calls) > 1
    snapshot = snapshot_optimizer(opt)
    params[-1].grad.data = params[-1].grad.float()  # (the float64 bucket's; the setter would refuse)
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()
    assert_optimizer_unchanged(opt, snapshot, f"{name} refused step")
    for opt, params in runs:
        _set_grads(params, 3)
        opt.step()
    for a, b in zip(params, ref_params):
        assert_close(a.detach(), b.detach())
        assert_same_state(opt.state[a], ref.state[b], name)


@pytest.mark.parametrize("name", ["SGD", "Adam", "Lamb"])
def test_several_kept_calls_are_the_calls_built_afresh_bit_for_bit(name):
    def make():
        opt, params = _several_buckets(name)
        opt.param_groups[0]["max_grad_norm"] = 0.5  # (one norm over every call's gradients)
        return opt, params

    _assert_kept_equals_afresh(make, name, clipped=True)


def test_a_call_that_raises_after_another_wrote_is_not_stepped_again(monkeypatch):
    # Not expected (each call was validated), but if it happens the step
    # must raise: the general path would step the written bucket twice.
    opt, params = _several_buckets("Adam")
    for step in range(2):
        _set_grads(params, step)
        opt.step()
    calls = opt._plan.kept_calls.calls

    def fail():
        raise RuntimeError("boom")

    monkeypatch.setattr(calls[1], "make", fail)
    _set_grads(params, 2)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad", "Lamb"])
def test_kept_calls_under_grad_scaler_are_the_calls_built_afresh_bit_for_bit(name):
    # GradScaler's scalars are this step's arguments, like the gradients; a
    # step it skips (an inf) writes nothing, and makes no state (step 0:
    # Note [a step AMP skips makes no state], which drops the plan).
    runs = []
    for keep in (True, False):
        opt, params = _several_buckets(name)
        opt.param_groups[0]["max_grad_norm"] = 0.5
        # (what fused=True sets: GradScaler's scalars reach the calls)
        opt._step_supports_amp_scaling = True
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        scales = []
        for step in range(8):
            scaler.scale(torch.ones(()))
            _set_grads(params, step)
            for p in params:
                p.grad *= scaler.get_scale()
            if step in (0, 4):
                params[1].grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
            if not keep and opt._plan is not None:
                opt._plan.kept_calls = None
        runs.append((opt, params, scales))
    (kept, kept_params, kept_scales), (fresh, fresh_params, fresh_scales) = runs
    assert kept._plan.kept_calls.calls[0]._call is not None  # (what ran)
    assert kept_scales == fresh_scales and kept_scales[0] == kept_scales[4] == 2.0**9  # (skipped)
    for i, (a, b) in enumerate(zip(kept_params, fresh_params)):
        assert torch.equal(a, b), f"{name} param {i}"
        assert torch.equal(a.grad, b.grad), f"{name} grad {i} (unscaled in place)"
        for key, value in fresh.state[b].items():
            assert torch.equal(kept.state[a][key], value), f"{name} {key} {i}"
    assert torch.equal(kept.grad_norm, fresh.grad_norm)


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_a_step_with_sparse_gradients_builds_no_kept_call(name, monkeypatch):
    # Sparse gradients take the general path (the op takes dense ones),
    # which must see that from the gradients, not by building calls that
    # the op then refuses, every step.
    kwargs = {"lr": 0.1, "momentum": 0.9} if name == "SGD" else {"lr": 0.1}
    runs = []
    for cls in (getattr(fused_optim, name), torch_class(name)):
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"embedding": torch.nn.Embedding(10, 4, sparse=True),
                                     "linear": torch.nn.Linear(4, 3)})
        runs.append((cls(model.parameters(), **kwargs), model))
    counts = _spy(monkeypatch, runs[0][0])
    for step in range(4):
        for opt, model in runs:
            opt.zero_grad()
            tokens = torch.tensor([step, 3, 7, step])
            model["linear"](model["embedding"](tokens)).square().sum().backward()
            opt.step()
    # (a step: the dense params' call, validated, then made)
    assert counts["op_call"] == 2 * 4
    (opt, model), (ref, ref_model) = runs
    for (pname, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert_close(p, q)
        assert_same_state(opt.state[p], ref.state[q], f"{name} {pname}")


@pytest.mark.parametrize("clipped", [False, True], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_kept_steps_after_backward_read_the_gradients_in_cpp(name, clipped, monkeypatch):
    # A training loop's gradients, made by autograd each step: the kept call
    # hands the op the params' gradients to read itself (Note [gradients
    # read in C++] in csrc/python_module.cpp), and so does the clipping
    # norm's sum_of_squares; Python reads none; the steps stay torch's.
    # (Lamb clips by default, as timm's: not here unless asked)
    unclipped = {"max_grad_norm": None} if name == "Lamb" else {}
    runs = []
    for cls, options in ((getattr(fused_optim, name), {"max_grad_norm": 1.0} if clipped else unclipped),
                         (torch_class(name), unclipped)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        runs.append((cls(model.parameters(), lr=0.01, **options), model))
    gathered = []
    grads_of = fused_optim._C.grads_of
    monkeypatch.setattr(fused_optim._C, "grads_of", lambda params: gathered.append(1) or grads_of(params))
    inputs = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    for step in range(5):
        gathered.clear()
        for opt, model in runs:
            opt.zero_grad()
            model(inputs * (step + 1)).square().sum().backward()
            if clipped and opt is runs[1][0]:
                torch_clip_(opt, [1.0])
            opt.step()
        if step >= 2:  # (after the plan's first steps: the kept call)
            assert gathered == [], f"{name} step {step}"
        (opt, model), (ref, ref_model) = runs
        for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
            assert_close(p, q, msg=lambda m: f"{name} step {step} param {i}: {m}")
            assert_same_state(opt.state[p], ref.state[q], f"{name} step {step} param {i}")


class _TwoDtypes(torch.nn.Module):
    """A float32 layer, then a float64 one: two buckets (two calls)."""

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(5, 7)
        self.last = torch.nn.Linear(7, 3).double()

    def forward(self, x):
        return self.last(torch.tanh(self.first(x)).double())


@pytest.mark.parametrize("clipped", [False, True], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_a_gradient_missing_after_kept_steps_takes_the_general_path_as_in_torch(name, calls,
                                                                               clipped):
    # The kept call reads the gradients in C++; one gone (a branch not taken)
    # makes that call (or with several, its validation; or first the
    # clipping norm's read) return unmade, and the step is the general
    # path's, equal to torch's; with every gradient back, the calls are
    # built again, with this step's lr, and kept.
    unclipped = {"max_grad_norm": None} if name == "Lamb" else {}
    runs = []
    for cls, options in ((getattr(fused_optim, name), {"max_grad_norm": 1.0} if clipped else unclipped),
                         (torch_class(name), unclipped)):
        torch.manual_seed(0)
        if calls == 1:
            model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
        else:
            model = _TwoDtypes()
        runs.append((cls(model.parameters(), lr=0.01, **options), model))
    inputs = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    for step in range(7):
        for opt, model in runs:
            opt.zero_grad()
            model(inputs * (step + 1)).square().sum().backward()
            if step in (3, 4):
                list(model.parameters())[-1].grad = None
            if clipped and opt is runs[1][0]:
                torch_clip_(opt, [1.0])
            opt.param_groups[0]["lr"] = 0.01 / (step + 1)  # (a scheduler: read every step)
            opt.step()
        (opt, model), (ref, ref_model) = runs
        for i, (p, q) in enumerate(zip(model.parameters(), ref_model.parameters())):
            assert_close(p, q, msg=lambda m: f"{name} step {step} param {i}: {m}")
            assert_same_state(opt.state.get(p, {}), ref.state.get(q, {}), f"{name} step {step} param {i}")
    kept = runs[0][0]._plan.kept_calls.calls
    assert len(kept) == calls and all(call._call is not None for call in kept)  # (kept again)
