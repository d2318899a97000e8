"""``run``: trains configurations in lockstep on the same batches, evaluates
them, stops the diverged, halves the field at rungs, and reports."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from fused_optim.sweep.lockstep import Lockstep
from fused_optim.sweep.results import COMPLETED, DIVERGED, HALVED, PRUNED, ConfigResult, SweepResult


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose largest logit is the target class."""
    return (output.argmax(-1) == target).float().mean()


METRICS = {"accuracy": accuracy}


@dataclass(frozen=True)
class Halving:
    """Successive halving inside the run (the rungs of ASHA, Li et al. 2020,
    run synchronously): at each step in ``rungs`` the configurations still
    training are ranked (validation loss, or without a validation split the
    mean training loss over the last quarter of the steps) and the worst ``drop``
    fraction of them stops, keeping at least ``min_keep``."""

    rungs: tuple
    drop: float = 0.5
    min_keep: int = 1

    def __post_init__(self):
        if not 0 < self.drop < 1:
            raise ValueError(f"Halving: drop must be in (0, 1), got {self.drop}")
        if any(r < 1 for r in self.rungs) or list(self.rungs) != sorted(set(self.rungs)):
            raise ValueError(f"Halving: rungs must be increasing steps >= 1, got {self.rungs}")

    @classmethod
    def geometric(cls, steps: int, rungs: int = 3, eta: float = 2.0) -> "Halving":
        """``rungs`` rungs, the last at steps / eta, each eta times later than
        the one before; drops 1 - 1/eta at each."""
        points = sorted({max(1, round(steps / eta ** i)) for i in range(1, rungs + 1)})
        return cls(tuple(points), drop=1 - 1 / eta)


def batches(data, batch_size: int, seed: int) -> Iterable:
    """Endless shuffled minibatches: from (inputs, targets) tensors, a new
    permutation per epoch from a generator seeded with ``seed``; or from an
    iterable of batches (a DataLoader), epoch after epoch."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        x, y = data
        if len(x) != len(y) or not 1 <= batch_size <= len(x):
            raise ValueError(f"training data of {len(x)} inputs and {len(y)} targets cannot be "
                             f"cut into batches of {batch_size}")
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x) - batch_size + 1, batch_size):
                index = order[start:start + batch_size]
                yield x[index], y[index]
    else:
        while True:
            empty = True
            for batch in data:
                empty = False
                yield batch
            if empty:
                raise ValueError("the training data yielded no batch")


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.start = total, enabled, time.perf_counter()
        self.shown = 0.0

    def update(self, step: int, alive: list, k: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.shown < 0.2 and step < self.total):
            return
        best = min(alive, key=lambda r: r.score()).name
        self.shown = now
        width = 24
        done = int(width * step / self.total)
        rate = step / max(1e-9, now - self.start)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] step {step}/{self.total} "
                         f"| {len(alive)}/{k} training | {rate:.0f} steps/s | best: {best[:60]:<60}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


Pruner = Callable[[int, list], Iterable[int]]


def run(model, configs, train, *, loss_fn=F.cross_entropy, val=None, steps: int = 300,
        batch_size: int = 64, eval_every: int = 50, metric="accuracy",
        halving: Halving | None = None, pruner: Pruner | None = None, seed: int = 0,
        device=None, progress: bool = False) -> SweepResult:
    """Trains every configuration for ``steps`` steps on the same batches.

    Args:
        model: an ``nn.Module`` or a factory returning one (``Lockstep``).
        configs: configuration dicts (``fused_optim.sweep.space``).
        train: ``(inputs, targets)`` tensors, shuffled into ``batch_size``
            batches with ``seed``; or an iterable of ``(inputs, targets)``.
        loss_fn: ``loss_fn(output, target)`` of one configuration.
        val: ``(inputs, targets)`` held out: loss and ``metric`` every
            ``eval_every`` steps and at the end.
        metric: ``"accuracy"``, a function ``(output, target) -> scalar``
            (higher is better; run under vmap), or None.
        halving: ``Halving`` rungs, or None.
        pruner: called after each evaluation with (step, the ConfigResults
            still training); returns the ``index`` of those to stop
            (reason "pruned"). The Optuna integration prunes through it.
        seed: seeds torch's RNG (dropout masks) and the batch order: the
            same seed and configurations give the same run, bit for bit.
        device: where to train (default: the model's).
        progress: a progress line on stderr.

    A configuration whose training loss becomes NaN or inf stops at once
    (reason "diverged", before its update), without touching the others.
    """
    torch.manual_seed(seed)
    metric_fn = METRICS.get(metric, metric) if isinstance(metric, str) else metric
    if isinstance(metric, str) and metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; give one of {list(METRICS)} or a function")
    lockstep = Lockstep(model, configs, loss_fn, total_steps=steps, device=device)
    results = [ConfigResult(i, c) for i, c in enumerate(lockstep.configs)]
    alive = list(results)  # alive[k] is lockstep slot k
    if val is not None:
        val = tuple(t.to(lockstep.device) for t in val)
    rungs = set(halving.rungs) if halving else set()
    bar = _Progress(steps, progress)
    started = time.perf_counter()

    def stop(slots_and_reasons: dict) -> None:
        nonlocal alive
        for slot, (reason, detail) in slots_and_reasons.items():
            r = alive[slot]
            r.stop_reason, r.stop_detail = reason, detail
            r.state_dict = None if reason == DIVERGED else lockstep.state_dict(slot)
        keep = [k for k in range(len(alive)) if k not in slots_and_reasons]
        alive = [alive[k] for k in keep]
        if alive:
            lockstep.keep(keep)

    def evaluate(step: int) -> None:
        if val is None or not alive:
            return
        losses, metrics = lockstep.evaluate(*val, metric=metric_fn)
        for k, r in enumerate(alive):
            r.val_steps.append(step)
            r.val_loss.append(losses[k])
            if metrics is not None:
                r.val_metric.append(metrics[k])
        # (an update can make the weights NaN after the last finite training loss)
        stop({k: (DIVERGED, f"validation loss {loss} at step {step}")
              for k, loss in enumerate(losses) if not math.isfinite(loss)})

    data = batches(train, batch_size, seed)
    first = next(data)  # (bad data raises here, before any training)
    for step in range(1, steps + 1):
        x, y = first if step == 1 else next(data)
        x, y = x.to(lockstep.device), y.to(lockstep.device)
        losses = lockstep.backward(x, y).tolist()
        diverged = {}
        for k, (r, loss) in enumerate(zip(alive, losses)):
            r.train_steps.append(step)
            r.train_loss.append(loss)
            if not math.isfinite(loss):
                diverged[k] = (DIVERGED, f"loss {loss} at step {step}")
            else:
                r.steps_trained = step
        if diverged:
            stop(diverged)
            if not alive:
                break
        lockstep.update()
        if step % eval_every == 0 or step == steps or step in rungs:
            evaluate(step)
            if pruner is not None and alive:
                chosen = set(pruner(step, list(alive)))
                stop({k: (PRUNED, f"at step {step}") for k, r in enumerate(alive) if r.index in chosen})
        if step in rungs and len(alive) > halving.min_keep:
            ranked = sorted(range(len(alive)), key=lambda k: _rung_score(alive[k], val is not None))
            n_drop = min(len(alive) - halving.min_keep, math.floor(len(alive) * halving.drop))
            stop({k: (HALVED, f"rung at step {step}") for k in ranked[len(ranked) - n_drop:]})
        if alive:
            bar.update(step, alive, len(results))
        else:
            break
    bar.close()
    for k, r in enumerate(alive):
        r.stop_reason = COMPLETED
        r.state_dict = lockstep.state_dict(k)
    return SweepResult(results, metric_name=metric if isinstance(metric, str) else
                       getattr(metric_fn, "__name__", None) if metric_fn else None,
                       steps=steps, seconds=time.perf_counter() - started)


def _rung_score(r: ConfigResult, with_val: bool) -> float:
    if with_val and r.val_loss:
        value = r.val_loss[-1]
    else:
        since = r.train_loss[-max(1, len(r.train_loss) // 4):]
        value = sum(since) / len(since)
    return value if math.isfinite(value) else math.inf
