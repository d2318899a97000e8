"""The per-group arguments a step hands its op, read on the hot path
(``_hyperparameter_lists``, the raw plan signature), against the readable
definitions they shortcut (``_hyperparameters``, ``_group_key``)."""

from __future__ import annotations

import pytest
import torch

from fused_optim import _ops
from optim_configs import GROUP_OVERRIDES, OPTIMIZER_NAMES

import fused_optim


def _optimizer(name, **overrides):
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(3)]
    groups = [{"params": [params[0]]}] + [
        {"params": [p], **o} for p, o in zip(params[1:], GROUP_OVERRIDES[name])
    ]
    return getattr(fused_optim, name)(groups, lr=0.01, **overrides)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_hyperparameter_lists_are_the_readable_hyperparameters_transposed(name):
    opt = _optimizer(name)
    # ints, and 1-element tensors where torch takes them, are read as floats
    opt.param_groups[0]["weight_decay"] = 0
    opt.param_groups[0]["eps"] = torch.tensor(1e-6, dtype=torch.float64)
    if "betas" in opt.param_groups[0]:
        opt.param_groups[0]["betas"] = (torch.tensor(0.8), 0.99)
    expected = [list(d.values()) for d in map(opt._hyperparameters, opt.param_groups)]
    names = _ops.SIGNATURES[opt._op_name].hyperparameters
    assert all(list(opt._hyperparameters(g)) == list(names) for g in opt.param_groups)
    lists = opt._hyperparameter_lists(opt.param_groups)
    assert lists == [list(column) for column in zip(*expected)]
    assert all(type(v) is float for column in lists for v in column)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_raw_group_key_covers_every_option_the_mode_reads(name):
    # A change of any option _mode reads changes the raw key, so the plan's
    # first, C-speed check sees it (the derived keys then decide).
    opt = _optimizer(name)
    group = opt.param_groups[1]
    for key in type(opt)._mode_keys:
        before = opt._raw_group_key(group)
        value = group[key]
        group[key] = (not value) if isinstance(value, bool) else value + 0.25
        assert opt._raw_group_key(group) != before, key
        group[key] = value
    read = []

    class Recording(dict):
        def __getitem__(self, key):
            read.append(key)
            return super().__getitem__(key)

        def get(self, key, default=None):
            read.append(key)
            return super().get(key, default)

    opt._mode(Recording(group))
    assert set(read) <= set(type(opt)._mode_keys), (read, type(opt)._mode_keys)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_a_momentum_or_beta_schedule_keeps_the_plan(name):
    # An option that changes every step without changing a bucket
    # (OneCycleLR's momentum/betas) must not rebuild the plan each step.
    opt = _optimizer(name)
    for p in (p for g in opt.param_groups for p in g["params"]):
        p.grad = torch.randn_like(p)
    opt.step()
    plan = opt._plan
    for step in range(3):
        for group in opt.param_groups:
            if "momentum" in group and group["momentum"] != 0:
                group["momentum"] = 0.5 + 0.1 * step
            if "betas" in group:
                group["betas"] = (0.8 + 0.01 * step, group["betas"][1])
            group["lr"] = 0.01 * (step + 1)
        opt.step()
        assert opt._plan is plan
    # a mode change does rebuild it
    key = next(iter(type(opt)._mode_keys), None)
    if key is not None:
        group = opt.param_groups[0]
        value = group[key]
        group[key] = (not value) if isinstance(value, bool) else (0.0 if value else 0.5)
        opt.step()
        assert opt._plan is not plan


def test_fused_false_on_an_optimizer_without_the_option_is_seen():
    # torch's RMSprop has no `fused`; a group that sets it to False still
    # asks for torch's code, and the plan must see the change.
    params = [torch.nn.Parameter(torch.randn(4))]
    opt = fused_optim.RMSprop(params, lr=0.01)
    params[0].grad = torch.randn(4)
    opt.step()
    plan = opt._plan
    opt.param_groups[0]["fused"] = False
    opt.step()
    assert opt._plan is not plan and opt._plan.torch_groups == [0]


def test_hyperparameters_not_group_options_are_read_by_name_whatever_the_dict_order():
    # The fallback of _hyperparameter_lists (a class whose hyperparameters
    # are not its group options as is) reads _hyperparameters by the op's
    # names.
    class Reordered(fused_optim.Adagrad):
        _hyperparameters_are_group_options = False

        def _hyperparameters(self, group):
            return {"eps": group["eps"], "weight_decay": group["weight_decay"], "lr_decay": group["lr_decay"]}

    opt = Reordered([torch.nn.Parameter(torch.randn(3))], lr=0.1, lr_decay=0.01,
                    weight_decay=0.2, eps=1e-7)
    assert opt._hyperparameter_lists(opt.param_groups) == [[0.01], [0.2], [1e-7]]
