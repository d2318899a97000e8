"""torch.optim's own test database drives ours.

torch ships, inside its wheel, the table its optimizer tests are generated
from (`torch.testing._internal.common_optimizers.optim_db`): for each class,
the keyword configurations it is tested with (`optim_inputs_func`), the
inputs that must raise and with which message (`optim_error_inputs_func`),
and its schedulers. Here every configuration of the seven classes torch.optim
shares with us, with each implementation keyword torch tests it under
(`foreach`, `fused`, `differentiable`), runs through ours and through
torch.optim with the same arguments, step by step, on params and on every
state tensor; and every error input raises what torch raises. When a torch
upgrade adds a configuration or an error, this file tests it without edits.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

# torch's test utilities import expecttest (scripts/bootstrap.sh installs it).
pytest.importorskip("expecttest")
from torch.testing._internal.common_optimizers import (  # noqa: E402
    OptimizerErrorEnum,
    _get_optim_inputs_including_global_cliquey_kwargs as _with_implementation_keywords,
    optim_db,
)

import fused_optim  # noqa: E402
from optim_configs import NOT_IN_TORCH, OPTIMIZER_NAMES  # noqa: E402

IN_TORCH = [n for n in OPTIMIZER_NAMES if n not in NOT_IN_TORCH]
INFOS = {info.optim_cls.__name__: info for info in optim_db if info.optim_cls.__name__ in IN_TORCH}
EACH = pytest.mark.parametrize("name", IN_TORCH)


def test_every_shared_class_is_in_torchs_database():
    assert sorted(INFOS) == sorted(IN_TORCH)


def _configs(name, device, dtype, skip=()):
    """torch's configurations of `name`, each also with every implementation
    keyword torch tests it under, as (description, kwargs)."""
    inputs = _with_implementation_keywords(device, dtype, INFOS[name], skip=skip)
    return [(i.desc, i.kwargs) for i in inputs]


@EACH
def test_error_inputs_raise_what_torch_raises(name):
    """Each error input of torch's database: same exception or warning
    class, message matching torch's pattern, at construction or at step."""
    ours = getattr(fused_optim, name)
    cases = INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert cases
    for case in cases:
        inputs = case.optimizer_error_input
        where = f"{name}: {inputs.desc}"
        construct = lambda: ours(inputs.params, **inputs.kwargs)  # noqa: E731
        act = (construct if case.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
               else lambda: construct().step())
        if issubclass(case.error_type, Warning):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                act()
            assert any(issubclass(w.category, case.error_type)
                       and re.search(case.error_regex, str(w.message)) for w in caught), where
        else:
            with pytest.raises(case.error_type, match=case.error_regex):
                act()


def _model_and_params(dtype, device):
    """torch's own fixture for comparing implementations: a small network
    and a 0-d param last (pytorch#100701)."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sigmoid(),
                                torch.nn.Linear(3, 1), torch.nn.Sigmoid()).to(dtype=dtype, device=device)
    scalar = torch.full((), 0.5, dtype=dtype, device=device, requires_grad=True)
    return model, list(model.parameters()) + [scalar]


def _run_beside(name, kwargs, dtype, device, steps=7):
    """Ours and torch.optim with the same kwargs through torch's comparison
    schedule: a layer frozen for two steps, one step with no gradients at
    all. Yields (step, ours' params and state, torch's)."""
    x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype, device=device).reshape(3, 2)
    runs = []
    for cls in (getattr(fused_optim, name), getattr(torch.optim, name)):
        model, params = _model_and_params(dtype, device)
        params[-1].grad = torch.full_like(params[-1], 0.25)
        runs.append((model, params, cls(params, **copy.deepcopy(kwargs))))
    for step in range(steps):
        for model, params, opt in runs:
            opt.zero_grad()
            if step == 3:
                model[2].requires_grad_(False)
            if step == 5:
                model[2].requires_grad_(True)
            if step != 2:
                model(x).sum().backward()
            opt.step()
        yield step, [(params, opt.state) for _, params, opt in runs]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@EACH
def test_every_configuration_steps_as_torch(name, dtype, device):
    """Every configuration torch tests, with every implementation keyword:
    params and each state tensor equal torch.optim's after every step (to
    the last bit where fused=False runs torch's own code; within float
    rounding for our fused step), and the same params have state."""
    # differentiable=True steps leaf params in place, which autograd refuses
    # (torch's tests skip it too, pytorch#116490; test_torch_compat runs it).
    for desc, kwargs in _configs(name, device, dtype, skip=("differentiable",)):
        if kwargs.get("capturable") and device == "cpu":
            continue  # torch refuses capturable on CPU params in its own tests
        exact = kwargs.get("fused") is False
        tolerance = dict(rtol=0, atol=0) if exact else {}
        for step, ((ours, ours_state), (theirs, their_state)) in _run_beside(name, kwargs, dtype, device):
            where = f"{name} {desc} {kwargs} step {step}"
            for i, (a, b) in enumerate(zip(ours, theirs)):
                torch.testing.assert_close(a, b, **tolerance, msg=lambda m: f"{where} param {i}: {m}")
                # torch's SGD keeps no entry without momentum; an empty entry
                # of ours (a defaultdict read) is the same state.
                mine, its = ours_state.get(a, {}), their_state.get(b, {})
                assert mine.keys() == its.keys(), f"{where} param {i}: {mine.keys()} vs {its.keys()}"
                for key in its:
                    torch.testing.assert_close(mine[key], its[key], **tolerance,
                                               msg=lambda m: f"{where} param {i} {key}: {m}")


@EACH
def test_complex_params_step_as_their_real_views(name):
    """torch's test_complex: complex params (and a real one beside them)
    step exactly as their view_as_real counterparts, every configuration."""
    for desc, kwargs in _configs(name, "cpu", torch.complex64, skip=("differentiable", "fused")):
        complex_params = [torch.randn(10, 5, dtype=torch.complex64, requires_grad=True),
                          torch.randn(10, dtype=torch.complex64, requires_grad=True),
                          torch.randn(10, 5, requires_grad=True)]
        real_params = [(torch.view_as_real(p) if p.is_complex() else p).detach().clone().requires_grad_()
                       for p in complex_params]
        on_complex = getattr(fused_optim, name)(complex_params, **kwargs)
        on_real = getattr(fused_optim, name)(real_params, **kwargs)
        for _ in range(3):
            for c, r in zip(complex_params, real_params):
                r.grad = torch.randn_like(r)
                c.grad = torch.view_as_complex(r.grad.clone()) if c.is_complex() else r.grad.clone()
            on_real.step()
            on_complex.step()
        as_real = [torch.view_as_real(p) if p.is_complex() else p for p in complex_params]
        torch.testing.assert_close(as_real, real_params, rtol=0, atol=0, msg=lambda m: f"{desc}: {m}")


@EACH
def test_schedulers_and_configurations_go_downhill(name):
    """torch's test_forloop_goes_right_direction, on contiguous and strided
    params: 20 steps under each of its schedulers lower the loss (raise it
    with maximize=True), for every configuration."""
    info = INFOS[name]
    for schedulers in [None, *info.scheduler_inputs]:
        for contiguous in (True, False):
            for desc, kwargs in _configs(name, "cpu", torch.float32, skip=("differentiable",)):
                torch.manual_seed(0)
                if contiguous:
                    weight, bias = torch.randn(10, 5), torch.randn(10)
                else:
                    weight, bias = torch.randn(10, 5, 2)[..., 0], torch.randn(10, 2)[..., 0]
                weight, bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
                x = torch.randn(5)
                opt = getattr(fused_optim, name)([weight, bias], **kwargs)
                made = [make(opt) for make in (schedulers or [])]

                def loss():
                    opt.zero_grad()
                    value = (weight.mv(x) + bias).pow(2).sum()
                    value.backward()
                    return value

                initial = loss().item()
                for _ in range(20):
                    value = loss()
                    opt.step()
                    for scheduler in made:
                        scheduler.step(value.item()) if isinstance(scheduler, ReduceLROnPlateau) \
                            else scheduler.step()
                final = loss().item()
                where = f"{name} {desc} contiguous={contiguous} schedulers={bool(made)}"
                assert (final > initial) if kwargs.get("maximize") else (final < initial), where


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours", "ours_to_ours"])
@pytest.mark.parametrize("named", [(True, False), (False, True), (True, True)],
                         ids=["named_saved", "named_loader", "named_both"])
@EACH
def test_named_parameters_round_trip(name, named, direction):
    """Optimizers built from `named_parameters()` save `param_names` in their
    groups; a checkpoint moves between named and unnamed optimizers, ours
    and torch's, and the loader keeps the names (torch's
    test_can_load_from_to_named_state_dict), then steps as the saver would."""
    saver_cls, loader_cls = {
        "ours_to_torch": (getattr(fused_optim, name), getattr(torch.optim, name)),
        "torch_to_ours": (getattr(torch.optim, name), getattr(fused_optim, name)),
        "ours_to_ours": (getattr(fused_optim, name), getattr(fused_optim, name)),
    }[direction]
    for desc, kwargs in _configs(name, "cpu", torch.float32, skip=("differentiable",)):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(4, 2, 1, stride=2), torch.nn.BatchNorm2d(2))
        twin = copy.deepcopy(model)
        x = torch.rand(1, 4, 16, 16)
        params = lambda m, use_names: m.named_parameters() if use_names else m.parameters()  # noqa: E731
        saver = saver_cls(params(model, named[0]), **kwargs)
        for _ in range(3):
            saver.zero_grad()
            model(x).sum().backward()
            saver.step()
        twin.load_state_dict(model.state_dict())
        loader = loader_cls(params(twin, named[1]), **kwargs)
        loader.load_state_dict(copy.deepcopy(saver.state_dict()))
        assert loader.state_dict()["param_groups"][0]["param_names"] == \
            ["0.weight", "0.bias", "1.weight", "1.bias"], desc
        for opt, m in ((saver, model), (loader, twin)):
            opt.zero_grad()
            m(x).sum().backward()
            opt.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, msg=lambda msg: f"{desc}: {msg}")


@EACH
def test_state_is_never_an_empty_entry(name):
    """torch's test_non_empty_state: every entry in `state` after a step
    holds something (SGD without momentum keeps none)."""
    for desc, kwargs in _configs(name, "cpu", torch.float32, skip=("differentiable",)):
        model = torch.nn.Linear(5, 5)
        opt = getattr(fused_optim, name)(model.parameters(), **kwargs)
        model(torch.rand(2, 5)).sum().backward()
        opt.step()
        assert all(len(entry) > 0 for entry in opt.state.values()), f"{name} {desc}"
