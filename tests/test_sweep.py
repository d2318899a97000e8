"""fused_optim.sweep: K configurations trained in lockstep (stacked params,
one batched forward/backward, one fused optimizer call per optimizer type).
The batched forward has two paths (plain batched ops for nn.Sequential MLPs,
vmap over functional_call otherwise) and K = 1 a third (no batching): the
tests that matter run on each.

The reference for every configuration is the same configuration trained
alone: a deepcopy of the module, torch.optim.<Class>(foreach=False), the
same batches in the same order, F.cross_entropy. Params, buffers AND
optimizer state are compared at assert_close's fp32 defaults. Where the
library promises bit-identity (dropping configurations, seeds), the test
uses torch.equal / ==.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import math
import signal
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import clip_grad_norm_
from torch.optim.lr_scheduler import LambdaLR, StepLR
from torch.testing import assert_close

import fused_optim
from fused_optim._reference import REFERENCE_CLASSES
from fused_optim import sweep
from fused_optim.sweep import stacked
from fused_optim.sweep.lockstep import Lockstep, warmup_cosine
from fused_optim.sweep.space import make_config

from harness import assert_same_state

# ----- models, data, the alone reference ---------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def bn_mlp() -> nn.Module:
    # No bias before the BatchNorm: its gradient would be 0 up to rounding, and
    # Adam-like rules turn that rounding noise into full-size steps (chaos, not a bug).
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))


class VmapMLP(nn.Module):
    """mlp() (or dropout_mlp()) written as a custom module: no nn.Sequential,
    so the lockstep runs it through vmap instead of the stacked fast path."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(8, 16), nn.Dropout(dropout), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(self.drop(F.relu(self.a(x))))


# The two batched paths of Lockstep.forward: plain batched ops on the stacked
# params for Sequential MLPs (stacked.py), vmap over functional_call otherwise.
PATHS = {"stacked": mlp, "vmap": VmapMLP}
DROPOUT_PATHS = {"stacked": dropout_mlp, "vmap": lambda: VmapMLP(0.5)}
paths = pytest.mark.parametrize("path", list(PATHS))


def check_path(model: nn.Module, path: str) -> None:
    assert (stacked.plan(model) is not None) == (path == "stacked"), f"{path} path not taken"


def make_data(n: int = 256, seed: int = 1, scale: float = 1.0, shift: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * scale + shift
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def batch_list(n_batches: int, batch_size: int = 32, seed: int = 2, **kwargs) -> list:
    """Distinct random batches, drawn independently of the library."""
    x, y = make_data(n_batches * batch_size, seed=seed, **kwargs)
    return list(zip(x.split(batch_size), y.split(batch_size)))


@dataclass
class Alone:
    module: nn.Module
    opt: torch.optim.Optimizer
    losses: list
    norms: list  # clip_grad_norm_'s total norms (when clipping)


def train_alone(module: nn.Module, spec: dict, batches: list, total_steps: int | None = None,
                loss_fn=F.cross_entropy) -> Alone:
    """The configuration trained alone with torch.optim (foreach=False)."""
    config = make_config(spec)
    m = copy.deepcopy(module)
    m.train()
    # torch.optim's class, or for an optimizer it lacks (Lion, Lars, Lamb)
    # the plain reference implementation of the same rule.
    cls = getattr(torch.optim, config.optimizer, None) or REFERENCE_CLASSES[config.optimizer]
    kwargs = {k: v for k, v in config.kwargs.items() if k != "max_grad_norm"}
    # (the class's default limit when the configuration sets none: Lamb's
    # 1.0, as timm's; clipped here, by clip_grad_norm_, not by the class)
    default = inspect.signature(getattr(fused_optim, config.optimizer)).parameters["max_grad_norm"].default
    clip = config.run.get("clip_grad_norm", config.kwargs.get("max_grad_norm", default))
    if "max_grad_norm" in inspect.signature(cls).parameters:
        kwargs["max_grad_norm"] = None
    opt = cls(m.parameters(), **kwargs, foreach=False)
    schedule = config.run.get("schedule", "constant")
    warmup = config.run.get("warmup_steps", 0)
    scheduler = None
    if callable(schedule):
        scheduler = schedule(opt)
    elif schedule == "cosine" or warmup:
        scheduler = LambdaLR(opt, warmup_cosine(warmup, total_steps or len(batches), schedule == "cosine"))
    losses, norms = [], []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(m(x), y)
        loss.backward()
        if clip is not None:
            norms.append(clip_grad_norm_(m.parameters(), clip).item())
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return Alone(m, opt, losses, norms)


def train_lockstep(model, specs, batches, total_steps: int | None = None,
                   loss_fn=F.cross_entropy) -> tuple[Lockstep, list]:
    lockstep = Lockstep(model, specs, loss_fn, total_steps=total_steps or len(batches))
    losses = []
    for x, y in batches:
        losses.append(lockstep.backward(x, y))
        lockstep.update()
    return lockstep, torch.stack(losses, 1)  # (K, steps)


def optimizer_state(lockstep: Lockstep, k: int, i: int) -> dict:
    """Optimizer state of param i of configuration k (its view's entry)."""
    opt = lockstep.optimizer_of(k)
    view = lockstep.views[k][i]
    assert view in opt.state, f"configuration {k} param {i}: no optimizer state"
    return opt.state[view]


def assert_like_alone(lockstep: Lockstep, k: int, alone: Alone, losses: torch.Tensor | None = None,
                      where: str = "") -> None:
    where = where or f"configuration {k} ({lockstep.configs[k].name})"
    ours, ref = lockstep.state_dict(k), alone.module.state_dict()
    assert list(ours) == list(ref), where
    for name, value in ref.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, f"{where} {name}"
        assert_close(ours[name], value, msg=lambda m: f"{where} {name}: {m}")
    for i, p in enumerate(alone.module.parameters()):
        if alone.opt.state[p]:
            assert_same_state(optimizer_state(lockstep, k, i), alone.opt.state[p], f"{where} param {i}")
    if losses is not None:
        assert_close(losses[k], torch.tensor(alone.losses), msg=lambda m: f"{where} losses: {m}")


def assert_moved(state_dict: dict, initial: dict, where: str) -> None:
    assert any(not torch.equal(state_dict[n], initial[n]) for n in initial), f"{where}: did not train"


def assert_equal_state_dicts(a: dict, b: dict, where: str) -> None:
    assert list(a) == list(b), where
    for name in a:
        assert torch.equal(a[name], b[name]), f"{where}: {name} differs"


# ----- 1. lockstep vs alone: every optimizer and option ---------------------------------

MIXED = [
    {"optimizer": "SGD", "lr": 0.1},
    {"optimizer": "SGD", "lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2},
    {"optimizer": "SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    {"optimizer": "SGD", "lr": 0.01, "momentum": 0.5, "maximize": True},
    {"optimizer": "Adagrad", "lr": 0.1, "lr_decay": 0.01, "weight_decay": 1e-2,
     "initial_accumulator_value": 0.1},
    {"optimizer": "Adagrad", "lr": 0.05, "maximize": True},
    {"optimizer": "RMSprop", "lr": 1e-3},
    {"optimizer": "RMSprop", "lr": 1e-3, "alpha": 0.9, "centered": True, "momentum": 0.9,
     "weight_decay": 1e-2},
    {"optimizer": "Adam", "lr": 1e-2},
    {"optimizer": "Adam", "lr": 1e-2, "betas": (0.8, 0.99), "amsgrad": True, "weight_decay": 1e-2},
    {"optimizer": "Adam", "lr": 1e-3, "maximize": True},
    {"optimizer": "AdamW", "lr": 1e-2, "weight_decay": 0.1},
    {"optimizer": "AdamW", "lr": 1e-2, "amsgrad": True},
]


@paths
def test_lockstep_matches_each_configuration_trained_alone(path):
    torch.manual_seed(0)
    model = PATHS[path]()
    check_path(model, path)
    initial = copy.deepcopy(model.state_dict())
    batches = batch_list(25)
    lockstep, losses = train_lockstep(model, MIXED, batches)
    assert lockstep.batched and len(lockstep.configs) == len(MIXED)
    # one fused optimizer per type, a group per config; AdamW configurations
    # are groups of the Adam optimizer with decoupled decay (one op call)
    family = {"AdamW": "Adam"}
    names = {family.get(s["optimizer"], s["optimizer"]) for s in MIXED}
    assert {cls.__name__ for cls in lockstep.optimizers} == names
    for cls, opt in lockstep.optimizers.items():
        assert type(opt) is cls
        assert len(opt.param_groups) == sum(
            family.get(s["optimizer"], s["optimizer"]) == cls.__name__ for s in MIXED)
    for k, spec in enumerate(MIXED):
        group = lockstep.groups[k]
        assert any(g is group for g in lockstep.optimizer_of(k).param_groups)
        if spec["optimizer"] in ("Adam", "AdamW"):
            assert group["decoupled_weight_decay"] == (spec["optimizer"] == "AdamW")
    for k, spec in enumerate(MIXED):
        alone = train_alone(model, spec, batches)
        assert_moved(alone.module.state_dict(), initial, f"alone {k}")
        assert_like_alone(lockstep, k, alone, losses)
    # the configurations really are different runs
    first = next(iter(initial))
    assert not torch.equal(lockstep.state_dict(0)[first], lockstep.state_dict(1)[first])


def test_stacked_path_layers_and_a_loss_run_under_vmap_match_alone():
    # Flatten, a Linear without bias, other elementwise modules; a loss that
    # is not plain F.cross_entropy (vmapped); targets that cross_entropy ignores
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 12, bias=False), nn.GELU(), nn.Linear(12, 12),
                          nn.Tanh(), nn.Identity(), nn.Linear(12, 3))
    check_path(model, "stacked")
    batches = [(x.view(-1, 2, 4), y) for x, y in batch_list(12)]
    batches[3][1][:5] = -100
    specs = [MIXED[2], MIXED[7], MIXED[9]]
    for loss_fn in (F.cross_entropy, lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1)):
        lockstep, losses = train_lockstep(model, specs, batches, loss_fn=loss_fn)
        for k, spec in enumerate(specs):
            assert_like_alone(lockstep, k, train_alone(model, spec, batches, loss_fn=loss_fn), losses)


def test_lockstep_state_dict_before_any_step_is_the_models():
    torch.manual_seed(0)
    model = mlp()
    lockstep = Lockstep(model, MIXED[:4], F.cross_entropy)
    for k in range(4):
        assert_equal_state_dicts(lockstep.state_dict(k), model.state_dict(), f"configuration {k}")
    # state_dict returns copies: writing into one changes nothing
    lockstep.state_dict(0)["0.weight"].add_(1.0)
    assert_equal_state_dicts(lockstep.state_dict(0), model.state_dict(), "after writing a copy")


# ----- 2. run keys: clipping, warmup + cosine, scheduler callables ---------------------------

RUN_KEY_CONFIGS = [
    {"optimizer": "SGD", "lr": 0.2, "schedule": lambda opt: StepLR(opt, 5, 0.5)},
    {"optimizer": "Adam", "lr": 1e-2, "warmup_steps": 5, "schedule": "cosine"},
    {"optimizer": "RMSprop", "lr": 1e-3, "warmup_steps": 3},
    {"optimizer": "SGD", "lr": 0.1, "momentum": 0.9, "clip_grad_norm": 0.05},
    {"optimizer": "AdamW", "lr": 1e-2, "clip_grad_norm": 0.1, "warmup_steps": 4, "schedule": "cosine"},
    {"optimizer": "Adagrad", "lr": 0.1, "schedule": lambda opt: LambdaLR(opt, lambda t: 1 / (1 + t))},
    {"optimizer": "Adam", "lr": 1e-2},  # no run keys at all, next to ones that have them
    # the optimizer's own clipping option: by this configuration's norm
    {"optimizer": "RMSprop", "lr": 1e-3, "max_grad_norm": 0.05},
]


# The optimizers torch.optim has only in part (RAdam, NAdam) or not at all
# (Lion, Lars, Lamb; their reference implementations are the oracle), with
# the clipping option: each configuration by its own norm, Lamb's by
# default (max_grad_norm=1.0, as timm's).
NEW_OPTIMIZER_CONFIGS = [
    {"optimizer": "RAdam", "lr": 1e-2, "weight_decay": 0.01, "decoupled_weight_decay": True},
    {"optimizer": "NAdam", "lr": 1e-2, "max_grad_norm": 0.1},
    {"optimizer": "Lion", "lr": 1e-3, "weight_decay": 0.1},
    {"optimizer": "Lars", "lr": 0.5, "momentum": 0.9, "weight_decay": 1e-3, "trust_coeff": 0.02},
    {"optimizer": "Lamb", "lr": 1e-2},  # (clips at 1.0: not reached here)
    {"optimizer": "Lamb", "lr": 1e-2, "max_grad_norm": 0.05, "always_adapt": True},
    {"optimizer": "Lamb", "lr": 2e-2, "max_grad_norm": None, "trust_clip": True,
     "decoupled_decay": True},
    {"optimizer": "Lion", "lr": 1e-3, "clip_grad_norm": 0.05},
]


def test_new_optimizers_per_configuration_match_alone():
    torch.manual_seed(0)
    model = mlp()
    batches = batch_list(20)
    lockstep, losses = train_lockstep(model, NEW_OPTIMIZER_CONFIGS, batches)
    for k, spec in enumerate(NEW_OPTIMIZER_CONFIGS):
        alone = train_alone(model, spec, batches)
        limit = spec.get("clip_grad_norm", spec.get("max_grad_norm"))
        if limit is not None:  # clipping really happened, at most steps
            clipped = sum(n > limit for n in alone.norms)
            assert clipped > len(batches) // 2, f"configuration {k}: clipped only {clipped} times"
        assert_like_alone(lockstep, k, alone, losses)


def test_a_configuration_clips_at_its_class_default():
    # Lamb clips at max_grad_norm=1.0 by default (timm's); the others do not.
    from fused_optim.sweep.lockstep import _clip_limit

    assert _clip_limit(make_config({"optimizer": "Lamb", "lr": 1e-2})) == 1.0
    assert _clip_limit(make_config({"optimizer": "Lamb", "lr": 1e-2, "max_grad_norm": None})) == math.inf
    assert _clip_limit(make_config({"optimizer": "Lamb", "lr": 1e-2, "clip_grad_norm": 0.5})) == 0.5
    assert _clip_limit(make_config({"optimizer": "Adam", "lr": 1e-2})) == math.inf


def test_warmup_cosine_factor():
    f = warmup_cosine(5, 25, True)
    assert [f(t) for t in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert f(5) == 1.0
    assert_close(f(12), 0.5 * (1 + math.cos(math.pi * 7 / 20)))
    assert f(25) == 0.0 and f(40) == 0.0
    values = [f(t) for t in range(5, 26)]
    assert all(a > b for a, b in zip(values, values[1:]))
    constant = warmup_cosine(3, 25, False)
    assert [constant(t) for t in range(6)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]


def test_run_keys_per_configuration_match_torch_alone():
    torch.manual_seed(0)
    model = mlp()
    batches = batch_list(24)
    total = 30  # cosine over 30 steps; stopped at 24: the schedule must use total_steps
    lockstep, losses = train_lockstep(model, RUN_KEY_CONFIGS, batches, total_steps=total)
    final_lrs = []
    for k, spec in enumerate(RUN_KEY_CONFIGS):
        alone = train_alone(model, spec, batches, total_steps=total)
        limit = spec.get("clip_grad_norm", spec.get("max_grad_norm"))
        if limit is not None:  # clipping really happened, at most steps
            clipped = sum(n > limit for n in alone.norms)
            assert clipped > len(batches) // 2, f"configuration {k}: clipped only {clipped} times"
        assert lockstep.groups[k]["lr"] == alone.opt.param_groups[0]["lr"], f"configuration {k} lr"
        final_lrs.append(lockstep.groups[k]["lr"])
        assert_like_alone(lockstep, k, alone, losses)
    # the schedules did differ within the run
    assert final_lrs[0] == 0.2 * 0.5 ** 4
    assert final_lrs[1] < 1e-2 and final_lrs[2] == 1e-3 and final_lrs[6] == 1e-2


def test_run_with_run_keys_matches_torch_alone():
    torch.manual_seed(0)
    model = mlp()
    steps = 20
    batches = batch_list(steps)
    configs = [RUN_KEY_CONFIGS[0], RUN_KEY_CONFIGS[1], RUN_KEY_CONFIGS[3], RUN_KEY_CONFIGS[4]]
    result = sweep.run(model, configs, train=batches, steps=steps, metric=None)
    for spec, r in zip(configs, result.results):
        alone = train_alone(model, spec, batches, total_steps=steps)
        assert r.stop_reason == "completed" and r.steps_trained == steps
        assert r.train_steps == list(range(1, steps + 1))
        assert_close(torch.tensor(r.train_loss), torch.tensor(alone.losses), msg=lambda m: f"{r.name}: {m}")
        ref = alone.module.state_dict()
        assert list(r.state_dict) == list(ref)
        for name in ref:
            assert_close(r.state_dict[name], ref[name], msg=lambda m: f"{r.name} {name}: {m}")


# ----- 3. buffers per configuration, dropout, seeds ------------------------------------------

BN_CONFIGS = [
    {"optimizer": "SGD", "lr": 0.1, "momentum": 0.9},
    {"optimizer": "Adam", "lr": 1e-2},
    {"optimizer": "RMSprop", "lr": 1e-3, "centered": True},
]


def test_batchnorm_buffers_are_per_configuration_and_used_in_eval():
    torch.manual_seed(0)
    model = bn_mlp()
    batches = batch_list(20, shift=0.5)
    x_val, y_val = make_data(100, seed=7, shift=0.5)
    lockstep, losses = train_lockstep(model, BN_CONFIGS, batches)
    before_eval = [lockstep.state_dict(k) for k in range(3)]
    val_losses, _ = lockstep.evaluate(x_val, y_val)
    for k, spec in enumerate(BN_CONFIGS):
        alone = train_alone(model, spec, batches)
        sd = lockstep.state_dict(k)
        assert_close(sd["1.running_mean"], alone.module[1].running_mean)
        assert_close(sd["1.running_var"], alone.module[1].running_var)
        assert sd["1.num_batches_tracked"].item() == 20
        assert_like_alone(lockstep, k, alone, losses)
        # evaluation: eval mode, with configuration k's running statistics
        m = alone.module.eval()
        with torch.no_grad():
            eval_loss = F.cross_entropy(m(x_val), y_val)
            train_mode_loss = F.cross_entropy(copy.deepcopy(m).train()(x_val), y_val)
        assert_close(torch.tensor(val_losses[k], dtype=torch.float32), eval_loss)
        assert not torch.isclose(train_mode_loss, eval_loss, rtol=1e-3, atol=0), "eval mode makes no difference"
        # evaluating changed no buffer, and left the lockstep in training mode
        assert_equal_state_dicts(sd, before_eval[k], f"configuration {k} after evaluate")
    assert lockstep.template.training
    # evaluation in chunks (33, 33, 33, 1 rows) weighs them by size
    chunked, _ = lockstep.evaluate(x_val, y_val, batch_size=33)
    assert_close(torch.tensor(chunked), torch.tensor(val_losses))
    assert not torch.allclose(lockstep.state_dict(0)["1.running_mean"], lockstep.state_dict(1)["1.running_mean"])


@paths
def test_dropout_differs_per_configuration_and_seed_reproduces_bit_for_bit(path):
    torch.manual_seed(0)
    model = DROPOUT_PATHS[path]()
    check_path(model, path)
    train, val = make_data(256, seed=3), make_data(64, seed=4)
    same = {"optimizer": "SGD", "lr": 0.1}
    configs = [same, same, {"optimizer": "Adam", "lr": 1e-2}]

    def go(seed):
        return sweep.run(model, configs, train=train, val=val, steps=15, batch_size=32, eval_every=5, seed=seed)

    a, b, other_seed = go(5), go(5), go(6)
    # two identical configurations draw different dropout masks
    assert a.results[0].train_loss != a.results[1].train_loss
    first = next(iter(model.state_dict()))
    assert not torch.equal(a.results[0].state_dict[first], a.results[1].state_dict[first])
    # the same seed reproduces every tensor and every loss, bit for bit
    for ra, rb in zip(a.results, b.results):
        assert_equal_state_dicts(ra.state_dict, rb.state_dict, ra.name)
        assert ra.train_loss == rb.train_loss and ra.val_loss == rb.val_loss
        assert ra.val_metric == rb.val_metric
    assert a.results[2].train_loss != other_seed.results[2].train_loss


# ----- 4. successive halving --------------------------------------------------------------

HALVING_CONFIGS = [
    {"optimizer": "SGD", "lr": 1e-3},
    {"optimizer": "Adam", "lr": 1e-2},
    {"optimizer": "SGD", "lr": 0.3, "momentum": 0.9},
    {"optimizer": "RMSprop", "lr": 1e-4},
    {"optimizer": "AdamW", "lr": 3e-3, "weight_decay": 0.1},
    {"optimizer": "SGD", "lr": 0.05, "momentum": 0.9, "nesterov": True},
    # schedules and clipping must survive the others being dropped
    {"optimizer": "Adam", "lr": 1e-2, "warmup_steps": 3, "schedule": "cosine", "clip_grad_norm": 0.3},
    {"optimizer": "SGD", "lr": 0.1, "schedule": lambda opt: StepLR(opt, 4, 0.7), "clip_grad_norm": 0.5},
]


@paths
def test_halving_drops_the_worst_half_and_leaves_the_rest_bit_identical(path):
    torch.manual_seed(0)
    model = PATHS[path]()
    check_path(model, path)
    train, val = make_data(256, seed=3), make_data(100, seed=4)

    def go(steps, halving=None):
        return sweep.run(model, HALVING_CONFIGS, train=train, val=val, steps=steps, batch_size=32,
                         eval_every=10, halving=halving)

    halved = go(30, sweep.Halving(rungs=(10,), drop=0.5))
    full, short = go(30), go(10)
    at_rung = [r.val_loss[r.val_steps.index(10)] for r in full.results]
    assert len(set(at_rung)) == len(at_rung) == 8
    worst = set(sorted(range(8), key=lambda i: at_rung[i])[4:])
    assert {r.index for r in halved.results if r.stop_reason == "halved"} == worst
    for r, f, s in zip(halved.results, full.results, short.results):
        if r.index in worst:
            assert r.steps_trained == 10 and r.train_steps == list(range(1, 11))
            assert r.train_loss == s.train_loss and r.val_loss == s.val_loss == [s.final_val_loss]
            assert_equal_state_dicts(r.state_dict, s.state_dict, f"halved {r.name} (weights at the rung)")
        else:
            assert r.stop_reason == "completed" and r.steps_trained == 30
            assert r.train_loss == f.train_loss and r.val_loss == f.val_loss and r.val_metric == f.val_metric
            assert_equal_state_dicts(r.state_dict, f.state_dict, f"kept {r.name}")


def test_halving_without_validation_ranks_by_recent_training_loss():
    torch.manual_seed(0)
    model = mlp()
    train = make_data(256, seed=3)

    def go(halving=None):
        return sweep.run(model, HALVING_CONFIGS, train=train, steps=16, batch_size=32, halving=halving)

    halved, full = go(sweep.Halving(rungs=(8,), drop=0.25, min_keep=1)), go()
    recent = [sum(r.train_loss[6:8]) / 2 for r in full.results]  # the last quarter of 8 steps
    assert len(set(recent)) == 8
    worst = set(sorted(range(8), key=lambda i: recent[i])[6:])  # floor(8 * 0.25) = 2
    assert {r.index for r in halved.results if r.stop_reason == "halved"} == worst
    for r, f in zip(halved.results, full.results):
        if r.index not in worst:
            assert r.train_loss == f.train_loss
            assert_equal_state_dicts(r.state_dict, f.state_dict, r.name)


def test_min_keep_and_geometric_rungs():
    torch.manual_seed(0)
    result = sweep.run(mlp(), HALVING_CONFIGS[:4], train=make_data(128, seed=3), steps=6, batch_size=32,
                       halving=sweep.Halving(rungs=(2, 4), drop=0.9, min_keep=3))
    reasons = sorted(r.stop_reason for r in result.results)
    assert reasons == ["completed"] * 3 + ["halved"]  # 4 -> 3 at step 2, nothing more at step 4
    geometric = sweep.Halving.geometric(100, rungs=3, eta=2.0)
    assert geometric.rungs == (12, 25, 50) and geometric.drop == 0.5
    assert sweep.Halving.geometric(90, rungs=2, eta=3.0).rungs == (10, 30)


def test_pruner_stops_the_chosen_and_leaves_the_others_bit_identical():
    torch.manual_seed(0)
    model = mlp()
    train, val = make_data(256, seed=3), make_data(64, seed=4)
    seen = []

    def pruner(step, alive):
        seen.append((step, [r.index for r in alive]))
        return [2] if step == 10 else []

    kwargs = dict(train=train, val=val, steps=20, batch_size=32, eval_every=5)
    pruned = sweep.run(model, HALVING_CONFIGS[:4], pruner=pruner, **kwargs)
    full = sweep.run(model, HALVING_CONFIGS[:4], **kwargs)
    short = sweep.run(model, HALVING_CONFIGS[:4], **{**kwargs, "steps": 10})
    assert seen == [(5, [0, 1, 2, 3]), (10, [0, 1, 2, 3]), (15, [0, 1, 3]), (20, [0, 1, 3])]
    r = pruned.results[2]
    assert r.stop_reason == "pruned" and r.steps_trained == 10
    assert_equal_state_dicts(r.state_dict, short.results[2].state_dict, "pruned")
    for i in (0, 1, 3):
        assert pruned.results[i].train_loss == full.results[i].train_loss
        assert_equal_state_dicts(pruned.results[i].state_dict, full.results[i].state_dict, f"kept {i}")


def test_halving_validates_its_arguments():
    for bad in [dict(rungs=(10,), drop=0.0), dict(rungs=(10,), drop=1.0), dict(rungs=(0,)),
                dict(rungs=(20, 10)), dict(rungs=(10, 10))]:
        with pytest.raises(ValueError):
            sweep.Halving(**bad)


# ----- 5. divergence ------------------------------------------------------------------------

GOOD = [{"optimizer": "Adam", "lr": 1e-3}, {"optimizer": "SGD", "lr": 1e-4, "momentum": 0.9},
        {"optimizer": "RMSprop", "lr": 1e-3, "warmup_steps": 4, "schedule": "cosine", "clip_grad_norm": 1.0}]
EXPLODES = {"optimizer": "SGD", "lr": 1e5}


@paths
def test_diverged_configuration_stops_and_leaves_the_others_bit_identical(path):
    torch.manual_seed(0)
    model = PATHS[path]()
    check_path(model, path)
    train = make_data(256, seed=3, scale=100.0)
    with_it = sweep.run(model, [GOOD[0], EXPLODES, GOOD[1], GOOD[2]], train=train, steps=20, batch_size=32)
    without = sweep.run(model, GOOD, train=train, steps=20, batch_size=32)
    bad = with_it.results[1]
    assert not math.isfinite(bad.train_loss[-1]), f"did not diverge: {bad.train_loss}"
    assert all(math.isfinite(v) for v in bad.train_loss[:-1])
    assert 1 < len(bad.train_loss) < 20, "must diverge mid-run, after a step with the others"
    assert bad.stop_reason == "diverged" and bad.state_dict is None
    assert bad.steps_trained == len(bad.train_loss) - 1
    for r, ref in zip([with_it.results[0], *with_it.results[2:]], without.results):
        assert r.stop_reason == "completed" and r.steps_trained == 20
        assert r.train_loss == ref.train_loss, f"{r.name}: curves differ from the run without the diverged one"
        assert_equal_state_dicts(r.state_dict, ref.state_dict, r.name)


def test_run_where_every_configuration_diverges_still_returns_a_result(tmp_path):
    torch.manual_seed(0)
    train = make_data(256, seed=3, scale=100.0)
    val = make_data(64, seed=4, scale=100.0)
    result = sweep.run(mlp(), [EXPLODES, {"optimizer": "SGD", "lr": 1e6}], train=train, val=val,
                       steps=20, batch_size=32, eval_every=2)
    assert [r.stop_reason for r in result.results] == ["diverged", "diverged"]
    assert all(r.state_dict is None and r.steps_trained < 20 for r in result.results)
    assert result.best in result.results
    assert len(result.leaderboard().splitlines()) == 4
    data = json.loads(result.to_json(tmp_path / "all.json").read_text())
    assert [c["stop_reason"] for c in data["configurations"]] == ["diverged", "diverged"]
    if _has_matplotlib():
        assert all(p.stat().st_size > 0 for p in result.plot(tmp_path / "all"))


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


# ----- 6. initial weights -------------------------------------------------------------------


def test_init_seed_draws_each_configurations_initial_weights():
    def built_under(seed):
        torch.manual_seed(seed)
        return mlp()

    specs = [{"optimizer": "SGD", "lr": 0.1, "init_seed": 1}, {"optimizer": "SGD", "lr": 0.1, "init_seed": 2},
             {"optimizer": "SGD", "lr": 0.1}]
    # a factory: called under each seed, and once under torch's current RNG for the shared one
    torch.manual_seed(5)
    lockstep = Lockstep(mlp, specs, F.cross_entropy)
    assert_equal_state_dicts(lockstep.state_dict(0), built_under(1).state_dict(), "init_seed 1")
    assert_equal_state_dicts(lockstep.state_dict(1), built_under(2).state_dict(), "init_seed 2")
    assert_equal_state_dicts(lockstep.state_dict(2), built_under(5).state_dict(), "shared")
    assert not torch.equal(lockstep.state_dict(0)["0.weight"], lockstep.state_dict(1)["0.weight"])
    # a module: copied, reset_parameters under the seed; torch's RNG untouched
    torch.manual_seed(9)
    model = mlp()
    rng = torch.get_rng_state()
    lockstep = Lockstep(model, [specs[2], specs[1]], F.cross_entropy)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_equal_state_dicts(lockstep.state_dict(0), model.state_dict(), "shared module")
    assert_equal_state_dicts(lockstep.state_dict(1), built_under(2).state_dict(), "module, init_seed 2")


def test_init_seed_configurations_train_like_their_own_module_alone():
    torch.manual_seed(0)
    model = mlp()
    batches = batch_list(3)
    specs = [{"optimizer": "Adam", "lr": 1e-2, "init_seed": 11}, {"optimizer": "Adam", "lr": 1e-2, "init_seed": 12}]
    result = sweep.run(model, specs, train=batches, steps=3, metric=None)
    for spec, r in zip(specs, result.results):
        torch.manual_seed(spec["init_seed"])
        alone = train_alone(mlp(), spec, batches)
        for name, value in alone.module.state_dict().items():
            assert_close(r.state_dict[name], value, msg=lambda m: f"{r.name} {name}: {m}")
    assert result.results[0].train_loss[0] != result.results[1].train_loss[0]


def test_user_module_is_not_modified_by_training():
    torch.manual_seed(0)
    model = bn_mlp()
    snapshot = copy.deepcopy(model.state_dict())
    result = sweep.run(model, BN_CONFIGS, train=make_data(128, seed=3), val=make_data(32, seed=4),
                       steps=8, batch_size=32)
    assert_equal_state_dicts(model.state_dict(), snapshot, "the user's module")
    assert all(p.grad is None for p in model.parameters())
    assert model.training
    for r in result.results:
        assert_moved(r.state_dict, snapshot, r.name)


# ----- 7. configurations: validation and helpers ---------------------------------------------

BAD = [
    ({"optimizer": "Adam", "lr": 1e-3, "momentum": 0.9}, "momentum"),  # unknown key
    ({"optimizer": "SGD", "lr": -1}, "-1"),  # bad value
    ({"optimizer": "Adam", "betas": (1.5, 0.9)}, "1.5"),
    ({"optimizer": "NoSuchOptimizer", "lr": 1e-3}, "NoSuchOptimizer"),  # unknown optimizer
    ({"lr": 1e-3}, "optimizer"),
    ({"optimizer": "SGD", "lr": 0.1, "warmup_steps": -1}, "warmup_steps"),
    ({"optimizer": "SGD", "lr": 0.1, "warmup_steps": 2.5}, "warmup_steps"),
    ({"optimizer": "SGD", "lr": 0.1, "schedule": "linear"}, "schedule"),
    ({"optimizer": "SGD", "lr": 0.1, "clip_grad_norm": 0}, "clip_grad_norm"),
    ({"optimizer": "SGD", "lr": 0.1, "clip_grad_norm": "1"}, "clip_grad_norm"),
    ({"optimizer": "SGD", "lr": 0.1, "init_seed": "a"}, "init_seed"),
    ({"optimizer": "SGD", "lr": 0.1, "max_grad_norm": -1.0}, "max_grad_norm"),
    ({"optimizer": "SGD", "lr": 0.1, "max_grad_norm": 1.0, "clip_grad_norm": 1.0}, "not both"),
]


@pytest.mark.parametrize("bad,mentions", BAD, ids=[m + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_configuration_raises_before_training_naming_it(bad, mentions):
    built = []

    def factory():
        built.append(1)
        return mlp()

    configs = [{"optimizer": "SGD", "lr": 0.1}, bad, {"optimizer": "Adam", "lr": 1e-3}]
    with pytest.raises(ValueError, match=r"configuration 1 ") as error:
        sweep.run(factory, configs, train=make_data(64), steps=2, batch_size=32)
    assert mentions in str(error.value)
    with pytest.raises(ValueError, match=r"configuration 1 "):
        Lockstep(factory, configs, F.cross_entropy)
    assert built == [], "the model was built before the configurations were checked"


def test_no_configurations_or_unknown_metric_raises():
    with pytest.raises(ValueError):
        sweep.run(mlp(), [], train=make_data(64), steps=2)
    with pytest.raises(ValueError, match="metric"):
        sweep.run(mlp(), [{"optimizer": "SGD"}], train=make_data(64), steps=2, metric="f1")


def test_training_set_smaller_than_a_batch_does_not_hang():
    # 10 rows, batch_size 64: either an error or training on what there is, not an endless loop
    def too_long(signum, frame):
        raise TimeoutError("sweep.run never returned: no batch can be drawn from 10 rows")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(10)
    try:
        try:
            result = sweep.run(mlp(), [{"optimizer": "SGD", "lr": 0.1}], train=make_data(10), steps=2,
                               batch_size=64)
        except ValueError:
            return
        assert result.results[0].steps_trained == 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_config_kwargs_and_name():
    config = make_config({"optimizer": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": True,
                          "warmup_steps": 3, "clip_grad_norm": 1.0})
    assert config.kwargs == {"lr": 0.1, "momentum": 0.9, "nesterov": True}
    assert config.run == {"warmup_steps": 3, "clip_grad_norm": 1.0}
    assert config.name.startswith("SGD-Nesterov")
    assert make_config({"optimizer": "Adam", "name": "mine"}).name == "mine"
    assert make_config({"optimizer": "Adam", "name": "mine"}).run == {}


def test_grid():
    configs = sweep.grid({"optimizer": "Adam"}, {"optimizer": "SGD", "momentum": 0.9}, lr=[1e-3, 1e-2, 1e-1])
    assert configs == [{"optimizer": "Adam", "lr": lr} for lr in (1e-3, 1e-2, 1e-1)] + [
        {"optimizer": "SGD", "momentum": 0.9, "lr": lr} for lr in (1e-3, 1e-2, 1e-1)]
    two_axes = sweep.grid(optimizer=["Adam", "AdamW"], lr=[1e-3, 1e-2], weight_decay=[0.0, 0.1, 0.2])
    assert len(two_axes) == 12
    assert len({tuple(sorted(c.items())) for c in two_axes}) == 12
    with pytest.raises(TypeError):
        sweep.grid({"optimizer": "Adam"}, lr=0.1)
    with pytest.raises(TypeError):
        sweep.grid({"optimizer": "Adam"}, optimizer="SGD")


def test_random_configs():
    bases = ({"optimizer": "AdamW"}, {"optimizer": "Adam"})
    space = dict(lr=sweep.loguniform(1e-4, 1e-1), weight_decay=sweep.uniform(0.0, 0.2),
                 betas=sweep.choice([(0.9, 0.99), (0.8, 0.9)]), eps=1e-6)
    a = sweep.random_configs(400, *bases, seed=3, **space)
    assert a == sweep.random_configs(400, *bases, seed=3, **space)
    assert a != sweep.random_configs(400, *bases, seed=4, **space)
    assert [c["optimizer"] for c in a[:4]] == ["AdamW", "Adam", "AdamW", "Adam"]
    lrs = [c["lr"] for c in a]
    assert all(1e-4 <= v <= 1e-1 for v in lrs)
    assert all(0.0 <= c["weight_decay"] <= 0.2 for c in a)
    assert {c["betas"] for c in a} == {(0.9, 0.99), (0.8, 0.9)}
    assert all(c["eps"] == 1e-6 for c in a)
    # log-uniform: half below the geometric mean (a uniform draw puts ~3% there),
    # and each decade gets about a third
    below = sum(v < math.sqrt(1e-4 * 1e-1) for v in lrs) / len(lrs)
    assert 0.4 < below < 0.6
    for low in (1e-4, 1e-3, 1e-2):
        share = sum(low <= v < 10 * low for v in lrs) / len(lrs)
        assert 0.25 < share < 0.42
    for config in a[:10]:
        make_config(config)
    with pytest.raises(ValueError):
        sweep.loguniform(0.0, 1.0)
    with pytest.raises(ValueError):
        sweep.uniform(1.0, 0.0)
    with pytest.raises(ValueError):
        sweep.random_configs(0, {"optimizer": "Adam"})


def test_lr_range():
    configs = sweep.lr_range({"optimizer": "SGD", "momentum": 0.9}, 1e-5, 1.0, k=16)
    lrs = [c["lr"] for c in configs]
    assert len(configs) == 16 and all(c["optimizer"] == "SGD" and c["momentum"] == 0.9 for c in configs)
    assert lrs[0] == 1e-5 and lrs[-1] == 1.0, f"endpoints {lrs[0]!r}, {lrs[-1]!r}"
    ratios = torch.tensor([b / a for a, b in zip(lrs, lrs[1:])], dtype=torch.float64)
    assert_close(ratios, torch.full((15,), 10 ** (5 / 15), dtype=torch.float64))
    for low, high, k in [(1e-4, 1e-1, 7), (3e-4, 0.3, 5), (1e-3, 1.0, 4)]:
        lrs = [c["lr"] for c in sweep.lr_range({"optimizer": "Adam"}, low, high, k)]
        assert len(lrs) == k and lrs[0] == low and lrs[-1] == high and lrs == sorted(lrs)
    assert sweep.lr_range({"optimizer": "Adam"}, 1e-3, 1e-1, k=1) == [{"optimizer": "Adam", "lr": 1e-3}]
    for bad in [(1e-3, 1e-1, 0), (0.0, 1e-1, 4), (1e-1, 1e-3, 4)]:
        with pytest.raises(ValueError):
            sweep.lr_range({"optimizer": "Adam"}, *bad)


# ----- 8. results --------------------------------------------------------------------------

RESULT_CONFIGS = [
    {"optimizer": "SGD", "lr": 1e-3},
    {"optimizer": "Adam", "lr": 1e-2, "betas": (0.9, 0.99)},
    {"optimizer": "AdamW", "lr": 3e-3},
    {"optimizer": "RMSprop", "lr": 1e-3, "momentum": 0.5},
]


@pytest.fixture(scope="module")
def finished_run():
    torch.manual_seed(0)
    model = mlp()
    val = make_data(100, seed=4)
    result = sweep.run(model, RESULT_CONFIGS, train=make_data(256, seed=3), val=val, steps=30,
                       batch_size=32, eval_every=10)
    return model, val, result


def test_leaderboard_and_best(finished_run):
    _, _, result = finished_run
    assert all(r.stop_reason == "completed" for r in result.results)
    scores = [r.final_val_loss for r in result.results]
    assert len(set(scores)) == 4
    assert result.best.final_val_loss == min(scores)
    assert [r.final_val_loss for r in result.ranked()] == sorted(scores)
    lines = result.leaderboard().splitlines()
    assert len(lines) == 2 + len(RESULT_CONFIGS)
    for rank, (line, r) in enumerate(zip(lines[2:], result.ranked()), 1):
        assert line.split()[0] == str(rank) and r.name in line
    assert result.best.name in lines[2]
    assert {r.name for r in result.results} == {r.name for r in result.ranked()}
    assert len(result.markdown().splitlines()) == 2 + len(RESULT_CONFIGS)
    for r in result.results:
        assert r.val_steps == [10, 20, 30] and len(r.val_metric) == 3
        assert all(0.0 <= v <= 1.0 for v in r.val_metric)


def test_best_rebuilds_its_optimizer_and_weights(finished_run):
    model, (x_val, y_val), result = finished_run
    best = result.best
    fresh = copy.deepcopy(model)
    optimizer = getattr(fused_optim, best.config.optimizer)(fresh.parameters(), **best.kwargs)
    assert type(optimizer) is getattr(fused_optim, best.config.optimizer)
    for key, value in best.kwargs.items():
        assert optimizer.param_groups[0][key] == value
    fresh.load_state_dict(best.state_dict)
    fresh.eval()
    with torch.no_grad():
        out = fresh(x_val)
        loss = F.cross_entropy(out, y_val)
    assert_close(torch.tensor(best.final_val_loss, dtype=torch.float32), loss)
    assert best.final_metric == pytest.approx(sweep.accuracy(out, y_val).item())
    # kwargs is a copy: editing it does not change the configuration
    best.kwargs["lr"] = 123.0
    assert best.config.kwargs["lr"] != 123.0


def test_to_json_holds_every_configuration(finished_run, tmp_path):
    _, _, result = finished_run
    path = result.to_json(tmp_path / "sub" / "result.json")
    data = json.loads(path.read_text())
    assert data["steps"] == 30 and data["metric"] == "accuracy"
    assert data["best"] == result.best.index
    assert sorted(data["ranking"]) == list(range(4)) and data["ranking"][0] == result.best.index
    assert [c["name"] for c in data["configurations"]] == [r.name for r in result.results]
    for entry, r, spec in zip(data["configurations"], result.results, RESULT_CONFIGS):
        assert entry["config"]["optimizer"] == spec["optimizer"] and entry["kwargs"]["lr"] == spec["lr"]
        assert entry["train_loss"] == r.train_loss and entry["val_loss"] == r.val_loss
        assert entry["final_val_loss"] == r.final_val_loss


def test_plot_writes_png_and_svg(finished_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, result = finished_run
    paths = result.plot(tmp_path / "curves", title="t")
    assert sorted(p.suffix for p in paths) == [".png", ".svg"]
    png, svg = tmp_path / "curves.png", tmp_path / "curves.svg"
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert svg.stat().st_size > 1000 and b"<svg" in svg.read_bytes()[:2000]


def test_ranking_puts_completed_before_halved_before_diverged(tmp_path):
    torch.manual_seed(0)
    train, val = make_data(256, seed=3, scale=100.0), make_data(64, seed=4, scale=100.0)
    configs = [EXPLODES, *HALVING_CONFIGS[:4], {"optimizer": "Adam", "lr": 1e-3}]
    result = sweep.run(mlp(), configs, train=train, val=val, steps=20, batch_size=32, eval_every=5,
                       halving=sweep.Halving(rungs=(10,), drop=0.5))
    reasons = [r.stop_reason for r in result.ranked()]
    assert reasons == ["completed"] * 3 + ["halved"] * 2 + ["diverged"], reasons
    ranked = result.ranked()
    assert ranked[0].final_val_loss <= ranked[1].final_val_loss <= ranked[2].final_val_loss
    assert ranked[3].final_val_loss <= ranked[4].final_val_loss
    assert result.best is ranked[0] and result.best.stop_reason == "completed"
    # a halved configuration may have a lower loss than a completed one: still after it
    lines = result.leaderboard().splitlines()[2:]
    assert [line.split()[0] for line in lines] == [str(i) for i in range(1, 7)]
    assert "diverged" in lines[-1]
    assert json.loads(result.to_json(tmp_path / "r.json").read_text())["ranking"] == [r.index for r in ranked]


# ----- 9. one configuration: the path without vmap --------------------------------------------


@pytest.mark.parametrize("factory", [bn_mlp, mlp], ids=["batchnorm", "mlp"])
def test_single_configuration_equals_it_inside_a_larger_run_and_alone(factory):
    torch.manual_seed(0)
    model = factory()
    steps = 20
    batches = batch_list(steps, shift=0.5)
    x_val, y_val = make_data(64, seed=4, shift=0.5)
    spec = {"optimizer": "RMSprop", "lr": 1e-3, "momentum": 0.9, "centered": True, "weight_decay": 1e-2}
    assert Lockstep(model, [spec], F.cross_entropy).batched is False
    single = sweep.run(model, [spec], train=batches, val=(x_val, y_val), steps=steps, eval_every=10)
    three = sweep.run(model, [BN_CONFIGS[0], spec, BN_CONFIGS[1]], train=batches, val=(x_val, y_val),
                      steps=steps, eval_every=10)
    alone = train_alone(model, spec, batches)
    one, inside = single.results[0], three.results[1]
    assert one.stop_reason == inside.stop_reason == "completed"
    ref = alone.module.state_dict()
    for name in ref:
        assert_close(one.state_dict[name], inside.state_dict[name], msg=lambda m: f"{name}: {m}")
        assert_close(one.state_dict[name], ref[name], msg=lambda m: f"{name} vs alone: {m}")
    assert_close(torch.tensor(one.train_loss), torch.tensor(inside.train_loss))
    assert_close(torch.tensor(one.train_loss), torch.tensor(alone.losses))
    assert_close(torch.tensor(one.val_loss), torch.tensor(inside.val_loss))
    assert_close(torch.tensor(one.val_metric), torch.tensor(inside.val_metric))
    with torch.no_grad():
        eval_loss = F.cross_entropy(alone.module.eval()(x_val), y_val)
    assert_close(torch.tensor(one.final_val_loss, dtype=torch.float32), eval_loss)


# ----- 10. the digits example --------------------------------------------------------------


def test_digits_load_is_a_stratified_split():
    pytest.importorskip("sklearn")
    from fused_optim.sweep import digits

    (x_train, y_train), (x_val, y_val) = digits.load()
    assert x_train.shape[1:] == x_val.shape[1:] == (1, 8, 8)
    assert x_train.dtype == x_val.dtype == torch.float32
    assert len(x_train) == len(y_train) and len(x_val) == len(y_val)
    assert len(x_train) + len(x_val) == 1797
    both = torch.cat([x_train, x_val])
    assert both.min() == 0.0 and both.max() == 1.0
    counts = torch.bincount(torch.cat([y_train, y_val]), minlength=10)
    val_counts = torch.bincount(y_val, minlength=10)
    assert val_counts.tolist() == [round(c * 0.25) for c in counts.tolist()]
    # the same images, split differently: every training row plus every val row is the whole set
    from sklearn.datasets import load_digits

    everything = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    key = lambda t: sorted(map(tuple, t.flatten(1).tolist()))  # noqa: E731
    assert key(both) == key(everything)
    (x2, _), _ = digits.load()
    assert torch.equal(x2, x_train)
    (x3, _), _ = digits.load(seed=1)
    assert not torch.equal(x3, x_train)
    (_, _), (x_half, _) = digits.load(val_fraction=0.5, dtype=torch.float64)
    assert x_half.dtype == torch.float64 and abs(len(x_half) - 1797 / 2) <= 10


def test_digits_optimizer_space_and_models():
    from fused_optim.sweep import digits

    space = digits.optimizer_space()
    assert len(space) == 35
    configs = [make_config(c, i) for i, c in enumerate(space)]
    families = {}
    for c in configs:
        key = (c.optimizer, c.kwargs.get("momentum", 0), c.kwargs.get("nesterov", False))
        families.setdefault(key, []).append(c.kwargs["lr"])
    assert sorted(families) == sorted([("SGD", 0, False), ("SGD", 0.9, False), ("SGD", 0.9, True),
                                       ("Adagrad", 0, False), ("RMSprop", 0, False), ("Adam", 0, False),
                                       ("AdamW", 0, False)])
    assert all(len(set(lrs)) == 5 for lrs in families.values())
    three = digits.optimizer_space(3)
    assert len(three) == 21
    assert [c["lr"] for c in three[:3]] == [0.03, 0.1, 0.3]
    x = torch.rand(5, 1, 8, 8)
    for factory in (digits.cnn, digits.mlp):
        assert factory()(x).shape == (5, 10)
    assert sum(p.numel() for p in digits.mlp().parameters()) == 8970


def test_over_seeds_ranks_configurations_by_their_mean_over_initializations():
    torch.manual_seed(0)
    train, val = make_data(), make_data(seed=2)
    configs = [{"optimizer": "Adam", "lr": lr, "init_seed": s} for lr in (1e-4, 3e-2) for s in (0, 1, 2)]
    result = sweep.run(mlp, configs, train, val=val, steps=12, batch_size=32, eval_every=6)
    table = result.over_seeds().splitlines()
    assert len(table) == 2 + 2  # header, rule, one row per configuration
    means = {}
    for lr in (1e-4, 3e-2):
        members = [r for r in result.results if r.config.kwargs["lr"] == lr]
        losses = [r.final_val_loss for r in members]
        means[lr] = sum(losses) / 3
        row = next(line for line in table[2:] if f"lr={lr:.3g} " in line + " ")
        assert " 3 " in row and f"{means[lr]:.4f}" in row
        assert f"{min(losses):.4f}-{max(losses):.4f}" in row
        assert len({tuple(r.state_dict["0.weight"].flatten()[:3].tolist()) for r in members}) == 3
    best_lr = min(means, key=means.get)
    assert f"lr={best_lr:.3g} " in table[2] + " " and table[2].startswith("1 ")


class _WithUnusedParam(nn.Module):
    """A model with a param the loss never reaches (a frozen branch)."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(8, 4)
        self.unused = nn.Linear(8, 4)

    def forward(self, x):
        return self.used(x)


def test_a_param_the_loss_does_not_reach_is_left_alone_as_in_a_plain_loop():
    # zero_grad(set_to_none=True) leaves such a param without a gradient, so
    # torch.optim skips it (no weight decay either); lockstep must too.
    torch.manual_seed(0)
    model = _WithUnusedParam()
    specs = [{"optimizer": "AdamW", "lr": 1e-2, "weight_decay": 0.5},
             {"optimizer": "SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}]
    x = torch.randn(64, 8)
    y = torch.randint(0, 4, (64,))
    batches = list(zip(x.split(16), y.split(16)))
    lockstep, _ = train_lockstep(model, specs, batches)
    for k, spec in enumerate(specs):
        alone = train_alone(model, spec, batches)
        assert_like_alone(lockstep, k, alone)
        assert torch.equal(lockstep.state_dict(k)["unused.weight"], model.unused.weight)
        assert lockstep.views[k][2].grad is None  # (unused.weight)


def test_set_slice_grads_refuses_gradients_that_do_not_fit():
    from fused_optim import _C

    views = [[torch.zeros(3)], [torch.zeros(3)]]
    with pytest.raises(RuntimeError, match="for 2 models"):
        _C.set_slice_grads(views, [torch.ones(3, 3)])
    with pytest.raises(RuntimeError, match="do not match its view"):
        _C.set_slice_grads(views, [torch.ones(2, 4)])
    with pytest.raises(RuntimeError, match="has 1 views for 2 gradients"):
        _C.set_slice_grads(views, [torch.ones(2, 3), torch.ones(2, 3)])
    _C.set_slice_grads(views, [torch.arange(6.0).view(2, 3)])
    assert views[1][0].grad.tolist() == [3.0, 4.0, 5.0]
