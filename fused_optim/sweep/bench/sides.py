"""The two sides a run compares, on the same batches from the same initial
weights: K configurations in lockstep (one batched model, fused_optim), and
K sequential models each with its own torch.optim optimizer."""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F

from fused_optim.bench import OPTIMIZERS as BENCH_OPTIMIZERS, optimizer_class, time_call_cpu
from fused_optim.sweep import digits
from fused_optim.sweep.bench.configs import family_of
from fused_optim.sweep.lockstep import Lockstep
from fused_optim.sweep.space import Config
from fused_optim.sweep.trainer import batches

SIDES = ("lockstep", "sequential")
# torch.optim's implementations, named as in fused_optim.bench.IMPLS.
TORCH_IMPLS = ("torch-fused", "torch-foreach", "torch-forloop")
# torch.optim's class name -> its spec in fused_optim.bench (torch_has_fused).
TORCH_SPECS = {spec.class_name: spec for spec in BENCH_OPTIMIZERS.values()}
N_BATCHES = 21  # one epoch of the digits training split at batch 64, cycled


class Batches:
    """The same batches for every side: ``stream()`` cycles through them
    from the first, one stream per side."""

    def __init__(self, batch_size: int, seed: int):
        (x, y), _ = digits.load(seed=seed)
        self.batches = list(itertools.islice(batches((x, y), batch_size, seed), N_BATCHES))

    def stream(self):
        return itertools.cycle(self.batches)


def torch_optimizer(config: Config, params, impl: str) -> torch.optim.Optimizer:
    """torch.optim's class of ``config`` with its hyperparameters, in
    implementation ``impl`` (one of TORCH_IMPLS)."""
    cls, impl_kwargs = optimizer_class(impl, TORCH_SPECS[config.optimizer], None)
    return cls(params, **config.kwargs, **impl_kwargs)


def torch_impls(config: Config) -> list[str]:
    """The implementations torch.optim has for ``config``'s class on CPU."""
    has_fused = TORCH_SPECS[config.optimizer].torch_has_fused
    return [impl for impl in TORCH_IMPLS if impl != "torch-fused" or has_fused]


class Sequential:
    """K models, each with its own torch.optim optimizer, trained one after
    the other: the way to run K configurations without lockstep."""

    def __init__(self, module, configs: list[Config], impls: dict[str, str]):
        self.models = [copy.deepcopy(module) for _ in configs]
        self.optimizers = [
            torch_optimizer(config, model.parameters(), impls[family_of(config)])
            for config, model in zip(configs, self.models)
        ]

    def step(self, x, y, step_times: list | None = None) -> None:
        """One training step of every model; with ``step_times``, appends
        the time of each ``optimizer.step()``."""
        for model, optimizer in zip(self.models, self.optimizers):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            if step_times is None:
                optimizer.step()
            else:
                step_times.append(time_call_cpu(optimizer.step))

    def finite(self) -> list[bool]:
        return [all(bool(p.isfinite().all()) for p in m.parameters()) for m in self.models]


def lockstep_step(lockstep: Lockstep):
    def step(x, y) -> None:
        lockstep.backward(x, y)
        lockstep.update()

    return step


def lockstep_finite(lockstep: Lockstep) -> list[bool]:
    return [
        all(bool(t.isfinite().all())
            for t in lockstep.state_dict(k).values() if t.is_floating_point())
        for k in range(len(lockstep.configs))
    ]


def build_side(side: str, model_name: str, configs: list[Config], impls, seed: int):
    """(step(x, y), finite() -> per-configuration flags) of one side, from
    the model drawn with ``seed`` (the same weights for both sides)."""
    torch.manual_seed(seed)
    module = digits.MODELS[model_name]()
    if side == "lockstep":
        lockstep = Lockstep(module, configs, F.cross_entropy)  # (no schedules: no total_steps)
        return lockstep_step(lockstep), lambda: lockstep_finite(lockstep)
    sequential = Sequential(module, configs, impls)
    return sequential.step, sequential.finite


def block_of(step, stream, steps: int):
    """A call running ``steps`` training steps on the next batches."""

    def run() -> None:
        for _ in range(steps):
            step(*next(stream))

    return run
