"""A step that raises changes nothing, whichever call of the step finds the
bad input; the cached plan follows changes made to params between steps;
overlapping params are refused; tensor betas are read every step; a
gradient that aliases its param is read as torch reads it."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import fused_optim
from harness import assert_optimizer_unchanged, snapshot_optimizer
from optim_configs import DENSE_STATE_OPTIONS, OPTIMIZER_NAMES, torch_class


def _two_bucket_groups(seed=0, dtype=torch.float32):
    # Two calls per step: the groups differ in a mode flag (maximize).
    torch.manual_seed(seed)
    first = [torch.randn(4, 3, dtype=dtype, requires_grad=True), torch.randn(5, dtype=dtype, requires_grad=True)]
    second = [torch.randn(6, dtype=dtype, requires_grad=True), torch.randn(2, 2, dtype=dtype, requires_grad=True)]
    return first, second


def _set_grads(params, step):
    for i, p in enumerate(params):
        torch.manual_seed(1000 * step + i)
        p.grad = torch.randn_like(p)


def _optimizer(name, first, second, **kwargs):
    cls = getattr(fused_optim, name)
    kwargs = {"lr": 0.05, **DENSE_STATE_OPTIONS[name], **kwargs}
    return cls([{"params": first}, {"params": second, "maximize": True}], **kwargs)


def _break_state_shape(opt, p):
    name = next(k for k, v in opt.state[p].items() if torch.is_tensor(v) and v.dim() > 0)
    opt.state[p][name] = torch.zeros(3)


def _break_step_dtype(opt, p):
    opt.state[p]["step"] = torch.tensor(5, dtype=torch.int32)


# In the second call (the second group), after the first call would have
# been written: each must be refused before anything is written.
LATE_ERRORS = {
    "state_of_wrong_shape": (_break_state_shape, "shape"),
}


@pytest.mark.parametrize("error", sorted(LATE_ERRORS))
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_error_in_a_later_call_writes_nothing(name, error):
    first, second = _two_bucket_groups()
    opt = _optimizer(name, first, second)
    _set_grads(first + second, 0)
    opt.step()
    breaker, match = LATE_ERRORS[error]
    breaker(opt, second[0])
    _set_grads(first + second, 1)
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert_optimizer_unchanged(opt, snap, error)


def test_expanded_param_in_a_later_call_writes_nothing():
    torch.manual_seed(0)
    first = [torch.randn(8, requires_grad=True)]
    expanded = torch.nn.Parameter(torch.randn(1).expand(5))
    opt = fused_optim.Adam([{"params": first}, {"params": [expanded], "amsgrad": True}], lr=0.1)
    _set_grads(first, 0)
    expanded.grad = torch.ones(5)
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="overlapping memory"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, "expanded param")


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_int_step_counter_is_accepted_as_torch(name):
    # torch accepts a step counter of an integer dtype (a hand-edited
    # checkpoint): so do we, converting it to float32 like a loaded one.
    runs = []
    for cls in (getattr(torch.optim, name), getattr(fused_optim, name)):
        torch.manual_seed(0)
        p = torch.randn(10, requires_grad=True)
        opt = cls([p], lr=0.05, **DENSE_STATE_OPTIONS[name])
        _set_grads([p], 0)
        opt.step()
        if "step" in opt.state[p]:
            opt.state[p]["step"] = torch.tensor(1, dtype=torch.int64)
        _set_grads([p], 1)
        opt.step()
        runs.append(p.detach().clone())
    torch.testing.assert_close(runs[1], runs[0])


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_sparse_gradient_of_wrong_shape_writes_nothing(name):
    torch.manual_seed(0)
    dense = torch.randn(4, 3, requires_grad=True)
    table = torch.randn(10, 3, requires_grad=True)
    opt = getattr(fused_optim, name)([dense, table], lr=0.1)
    _set_grads([dense], 0)
    bad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2, 4), (10, 4))
    table.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2, 3), (10, 3))
    table.grad.data = bad  # (the grad setter would refuse the shape)
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="shape"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, "sparse gradient of the wrong shape")


# ----- the plan follows changes to params ----------------------------------------------


def test_param_dtype_changed_between_steps():
    # p.data = p.data.double() on one param: torch keeps working, so do we.
    runs = []
    for cls in (torch.optim.SGD, fused_optim.SGD):
        torch.manual_seed(0)
        params = [torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)]
        opt = cls(params, lr=0.1)
        _set_grads(params, 0)
        opt.step()
        params[1].data = params[1].data.double()
        for step in range(1, 4):
            _set_grads(params, step)
            opt.step()
        runs.append([p.detach().clone() for p in params])
    for a, b in zip(*runs):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_model_double_after_steps():
    runs = []
    for cls in (torch.optim.SGD, fused_optim.SGD):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = cls(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            if step == 1:
                model.double()
            opt.zero_grad()
            model(torch.randn(2, 4, dtype=model.weight.dtype)).square().sum().backward()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b)


def _replace_first_param(opt):
    group = opt.param_groups[0]
    group["params"][0] = torch.nn.Parameter(group["params"][0].detach() + 1)


def _replace_first_state_dict(opt):
    # A hand-made restore: the same values, new dict and tensors, moments doubled.
    p = opt.param_groups[0]["params"][0]
    opt.state[p] = {k: v.clone() * (2 if torch.is_tensor(v) and v.dim() else 1)
                    for k, v in opt.state[p].items()}


def _pop_then_restore_state(opt):
    p = opt.param_groups[0]["params"][0]
    saved = opt.state.pop(p)
    opt.state.update({p: {k: v.clone() for k, v in saved.items()}})


@pytest.mark.parametrize("change", [_replace_first_param, _replace_first_state_dict,
                                    _pop_then_restore_state])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_plan_follows_params_and_state_dicts_replaced_between_steps(name, change):
    # torch.optim reads group["params"] and opt.state[p] every step; a plan
    # that cached the old param or the old state dict would update those.
    runs = []
    for cls in (torch_class(name), getattr(fused_optim, name)):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))]
        kwargs = {"momentum": 0.9} if name in ("SGD", "RMSprop", "Lars") else {}
        opt = cls(params, lr=0.1, **kwargs)
        for step in range(4):
            _set_grads(opt.param_groups[0]["params"], step)
            opt.step()
            if step == 1:
                change(opt)
        runs.append(opt)
    ref, ours = runs
    for p, q in zip(ref.param_groups[0]["params"], ours.param_groups[0]["params"]):
        # (defaults: RMSprop's sqrt rounds differently, test_properties.py)
        torch.testing.assert_close(q, p)
        assert ref.state[p].keys() == ours.state[q].keys()
        for key in ref.state[p]:
            torch.testing.assert_close(ours.state[q][key], ref.state[p][key], check_dtype=False)


def _run_with_state_reset(module, reset) -> tuple:
    """Four Adam steps of ``module`` with ``opt.state = reset()`` after the
    second: (the param, its step counter)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5))]
    opt = module.Adam(params, lr=0.1)
    for step in range(4):
        _set_grads(params, step)
        opt.step()
        if step == 1:
            opt.state = reset()
    assert isinstance(opt.state, defaultdict)
    return params[0].detach().clone(), float(opt.state[params[0]]["step"])


def test_state_replaced_wholesale_is_followed():
    # opt.state = defaultdict(dict) (as some wrappers do) starts over, as in torch.
    ref, ours = (_run_with_state_reset(m, lambda: defaultdict(dict))
                 for m in (torch.optim, fused_optim))
    assert torch.equal(ref[0], ours[0]) and ref[1] == ours[1] == 2.0


def test_state_replaced_by_a_plain_dict_starts_over():
    # opt.state = {} (torch's next step raises KeyError: its state must be
    # a defaultdict) is taken as a defaultdict of its entries: the same run
    # as the reset above.
    plain, reset = (_run_with_state_reset(fused_optim, r) for r in (dict, lambda: defaultdict(dict)))
    assert torch.equal(plain[0], reset[0]) and plain[1] == reset[1] == 2.0


# ----- precision changes are taken back with a failed step ------------------------------


def _bf16_master_run():
    torch.manual_seed(0)
    good = [torch.randn(6, dtype=torch.bfloat16, requires_grad=True)]
    other = [torch.randn(4, dtype=torch.bfloat16, requires_grad=True)]
    opt = fused_optim.AdamW([{"params": good}, {"params": other, "amsgrad": True}], lr=0.01,
                            master_weights=True)
    _set_grads(good + other, 0)
    opt.step()
    return opt, good, other


def _break_grad_dtype(p):
    p.grad = torch.ones_like(p)
    p.grad.data = torch.ones(p.shape, dtype=torch.float64)  # (the setter checks dtypes)


def test_master_weights_survive_a_failed_step_that_switched_them_off():
    opt, good, other = _bf16_master_run()
    master = opt.state[good[0]]["master_param"]
    bits = master.clone()
    keys = list(opt.state[good[0]])
    assert keys.index("master_param") < len(keys) - 1  # (not last: its place is checked)
    opt.param_groups[0]["master_weights"] = False
    _set_grads(good, 1)
    _break_grad_dtype(other[0])
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()
    # (the keys in their order too: state_dict() lists them so)
    assert_optimizer_unchanged(opt, snap, "master weights switched off, failed step")
    assert list(opt.state[good[0]]) == keys
    assert list(opt.state_dict()["state"][0]) == keys
    opt.param_groups[0]["master_weights"] = True
    assert opt.state[good[0]]["master_param"] is master
    assert torch.equal(master, bits)


def test_state_dtype_change_is_taken_back_with_a_failed_step():
    opt, good, other = _bf16_master_run()
    moments = {k: v for k, v in opt.state[good[0]].items()}
    opt.param_groups[0]["state_dtype"] = torch.bfloat16
    _set_grads(good, 1)
    _break_grad_dtype(other[0])
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="dtype"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, "state_dtype switched, failed step")
    for k, v in moments.items():
        assert opt.state[good[0]][k] is v


# ----- overlapping params ------------------------------------------------------------------


def test_overlapping_params_are_refused_before_writing():
    # torch updates overlapping views one after the other; run in parallel
    # they would race. Refused, clearly, with nothing written.
    buffer = torch.randn(1000)
    a = torch.nn.Parameter(buffer[:600])
    b = torch.nn.Parameter(buffer[400:])
    opt = fused_optim.Adam([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(600), torch.ones(600)
    snap = snapshot_optimizer(opt)
    with pytest.raises(RuntimeError, match="share memory"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, "overlapping params")


def test_disjoint_views_of_one_buffer_are_fine():
    runs = []
    for cls in (torch.optim.Adam, fused_optim.Adam):
        torch.manual_seed(0)
        buffer = torch.randn(1000)
        params = [torch.nn.Parameter(buffer[:400]), torch.nn.Parameter(buffer[400:])]
        opt = cls(params, lr=0.1)
        for step in range(3):
            _set_grads(params, step)
            opt.step()
        runs.append(buffer.clone())
    torch.testing.assert_close(runs[1], runs[0])


# ----- tensor betas, aliased gradients ---------------------------------------------------------


def test_tensor_betas_are_read_every_step():
    runs = []
    for cls in (torch.optim.Adam, fused_optim.Adam):
        torch.manual_seed(0)
        p = torch.randn(20, requires_grad=True)
        betas = (torch.tensor(0.9), torch.tensor(0.999))
        opt = cls([p], lr=0.01, betas=betas)
        for step in range(4):
            betas[0].fill_(0.9 - 0.1 * step)  # a schedule on beta1, in place
            _set_grads([p], step)
            opt.step()
        runs.append(p.detach().clone())
    torch.testing.assert_close(runs[1], runs[0])


@pytest.mark.parametrize("maximize", [False, True])
def test_gradient_aliasing_its_param_as_torch(maximize):
    # Note [a gradient that aliases its param]
    runs = []
    for cls in (torch.optim.AdamW, fused_optim.AdamW):
        torch.manual_seed(0)
        p = torch.randn(50, requires_grad=True)
        opt = cls([p], lr=0.1, weight_decay=0.5, maximize=maximize)
        for _ in range(3):
            p.grad = p.data  # the param's own memory
            opt.step()
        runs.append(p.detach().clone())
    torch.testing.assert_close(runs[1], runs[0])


def test_group_without_momentum_under_a_nesterov_default():
    # Found by the property test: torch ignores nesterov in a group whose
    # momentum is 0; we refused the call.
    runs = []
    for cls in (torch.optim.SGD, fused_optim.SGD):
        torch.manual_seed(0)
        a, b = torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)
        opt = cls([{"params": [a]}, {"params": [b], "momentum": 0.0}], lr=0.1, momentum=0.9,
                  nesterov=True)
        for step in range(3):
            _set_grads([a, b], step)
            opt.step()
        runs.append([a.detach().clone(), b.detach().clone()])
    for x, y in zip(*runs):
        torch.testing.assert_close(x, y)


def test_adagrad_honours_a_groups_initial_accumulator_value():
    # Documented difference from torch.optim (which uses the constructor's
    # value for every group).
    a, b = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    c = torch.randn(3, requires_grad=True)
    opt = fused_optim.Adagrad([{"params": [a]}, {"params": [b], "initial_accumulator_value": 2.0}],
                              lr=0.1, initial_accumulator_value=0.5)
    opt.add_param_group({"params": [c], "initial_accumulator_value": 3.0})
    for p in (a, b, c):
        p.grad = torch.ones(3)
    opt.step()
    for p, start in ((a, 0.5), (b, 2.0), (c, 3.0)):
        assert torch.equal(opt.state[p]["sum"], torch.full((3,), start + 1.0))


def test_optimizer_state_counts_exactly_the_writes():
    # Every write to the mapping must reach the plan's signature; reads and
    # no-op calls must not (they would rebuild the plan every step).
    from fused_optim._state import OptimizerState
    state = OptimizerState()
    counts = [state.writes]
    state["a"]["x"] = 1                  # created by __missing__: a write
    state.setdefault("a", {})            # present: no write
    state.pop("missing", None)           # absent: no write
    _ = state["a"], "a" in state, state.get("b")
    counts.append(state.writes)
    state.setdefault("b", {})
    state.update({"c": {}})
    state |= {"d": {}}
    state.pop("d")
    del state["c"]
    state.popitem()
    state.clear()
    counts.append(state.writes)
    assert counts == [0, 1, 8]
    assert type(state) is OptimizerState


@pytest.mark.parametrize("unfused", [False, True], ids=["fused", "fused_false"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_lr_tensor_of_several_elements_set_later_writes_nothing(name, unfused):
    # torch.optim checks a tensor lr's size in the constructor only; one
    # assigned to a group later reached torch's code for a fused=False
    # group, which raised after the fused group and its own moments were
    # written. Refused before anything is written, whichever path.
    first, second = _two_bucket_groups()
    opt = _optimizer(name, first, second)
    if unfused:
        opt.param_groups[1]["fused"] = False
    _set_grads(first + second, 0)
    opt.step()
    opt.param_groups[1]["lr"] = torch.tensor([0.05, 0.01])
    _set_grads(first + second, 1)
    snap = snapshot_optimizer(opt)
    with pytest.raises(ValueError, match="param group 1 has an lr tensor of 2 elements"):
        opt.step()
    assert_optimizer_unchanged(opt, snap, "lr tensor of two elements")


def _capturable_on_the_cpu(opt, param):
    opt.param_groups[1]["capturable"] = True


def _moment_of_wrong_shape(opt, param):
    opt.state[param].update(step=torch.tensor(1.0), exp_avg=torch.zeros(3),
                            exp_avg_sq=torch.zeros_like(param))


@pytest.mark.parametrize("refusal, match", [
    (_capturable_on_the_cpu, "If capturable=True"),
    (_moment_of_wrong_shape, "must match the size"),
], ids=["capturable_on_the_cpu", "moment_of_wrong_shape"])
def test_refusal_inside_torchs_code_leaves_fused_groups_and_new_state_as_they_were(refusal, match):
    # torch's code for a fused=False group checks some things only as it
    # runs; it runs before the fused calls, so these are untouched, and the
    # state it made for a param's first step is taken back. (What it wrote
    # before raising, such as the step counter it increments before the
    # moments, stays written, as with torch.optim.)
    first, second = _two_bucket_groups()
    opt = fused_optim.Adam([{"params": first}, {"params": second, "fused": False}], lr=0.05)
    _set_grads(first, 0)
    opt.step()  # (the fused group has state)
    refusal(opt, second[0])
    _set_grads(first + second, 1)
    fused_before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})
                    for p in first]
    with pytest.raises((RuntimeError, AssertionError), match=match):
        opt.step()
    for p, (value, state) in zip(first, fused_before):
        assert torch.equal(p, value)
        assert opt.state[p].keys() == state.keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())
    assert second[1] not in opt.state
