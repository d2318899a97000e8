"""Configurations: plain dicts, and helpers that make lists of them.

A configuration names an optimizer and the keyword arguments of its class,
exactly as they would be passed to it, plus a few keys about the run::

    {"optimizer": "AdamW", "lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1}
    {"optimizer": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": True,
     "warmup_steps": 20, "schedule": "cosine", "clip_grad_norm": 1.0}

- ``optimizer``: one of ``OPTIMIZERS`` (the classes of fused_optim).
- every other key that the class takes (``lr``, ``momentum``, ``betas``,
  ``amsgrad``, ``centered``, ``master_weights``, ``state_dtype``, ...): the
  configuration's param group gets it, so ``Config.kwargs`` rebuilds the
  same optimizer: ``fused_optim.AdamW(model.parameters(), **best.kwargs)``.
- ``RUN_KEYS``: how the configuration is trained, not the optimizer:
  ``warmup_steps`` (the lr grows linearly over that many steps: lr / warmup
  at the first, full at step warmup), ``schedule`` (``"constant"`` or
  ``"cosine"``: cosine decay to 0 over the run after the warmup; or a
  callable ``optimizer -> torch.optim.lr_scheduler.LRScheduler``, stepped
  once per training step), ``clip_grad_norm`` (clip the configuration's
  gradients to this global L2 norm, as ``torch.nn.utils.clip_grad_norm_``;
  the optimizer's own ``max_grad_norm`` does the same, and stays in
  ``Config.kwargs`` so that the best configuration's optimizer clips alike),
  ``init_seed`` (initial weights drawn with this seed instead of the shared
  ones) and ``name`` (a label; made from the values otherwise).

Helpers: ``grid`` (cartesian product), ``random_configs`` with
``loguniform`` / ``uniform`` / ``choice`` (seeded), and ``lr_range`` (K
log-spaced learning rates: the LR range test, every rate trained in the
same run instead of one rate per step of a single run).
"""

from __future__ import annotations

import inspect
import itertools
import math
import random as _random
from dataclasses import dataclass
from typing import Any, Callable

import torch

import fused_optim

# Every optimizer class fused_optim exports.
OPTIMIZERS = tuple(
    name for name in fused_optim.__all__
    if isinstance(getattr(fused_optim, name), type)
    and issubclass(getattr(fused_optim, name), torch.optim.Optimizer)
)
RUN_KEYS = ("warmup_steps", "schedule", "clip_grad_norm", "init_seed", "name")
SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Config:
    """One validated configuration (see the module docstring)."""

    optimizer: str
    kwargs: dict  # the class's keyword arguments
    run: dict  # RUN_KEYS that were given
    name: str

    @property
    def optimizer_class(self) -> type:
        return getattr(fused_optim, self.optimizer)

    def as_dict(self) -> dict:
        """The configuration as given (JSON-friendly where its values are)."""
        return {"optimizer": self.optimizer, **self.kwargs, **self.run}


def make_config(spec: dict | Config, index: int = 0) -> Config:
    """Validates ``spec`` the way the class would, before anything trains:
    unknown keys, bad values (``lr=-1``) and bad run keys raise ValueError
    naming the configuration."""
    if isinstance(spec, Config):
        return spec
    where = f"configuration {index} ({spec!r})"
    if not isinstance(spec, dict):
        raise TypeError(f"{where}: a configuration is a dict, got {type(spec).__name__}")
    name = spec.get("optimizer")
    if name not in OPTIMIZERS:
        raise ValueError(f"{where}: 'optimizer' must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    cls = getattr(fused_optim, name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    kwargs = {k: v for k, v in spec.items() if k != "optimizer" and k not in RUN_KEYS}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"{where}: {name} takes no argument {', '.join(map(repr, unknown))} "
            f"(it takes {', '.join(sorted(accepted))}; run keys: {', '.join(RUN_KEYS)})"
        )
    try:  # the class's own checks (ranges, combinations), on a stand-in param
        cls([torch.zeros(1)], **kwargs)
    except (ValueError, TypeError, RuntimeError) as error:
        raise ValueError(f"{where}: {error}") from None
    run = {k: spec[k] for k in RUN_KEYS if k in spec}
    _check_run_keys(run, where)
    if run.get("clip_grad_norm") is not None and kwargs.get("max_grad_norm") is not None:
        raise ValueError(f"{where}: give clip_grad_norm or max_grad_norm, not both")
    label = run.pop("name", None) or _label(name, kwargs, run)
    return Config(name, kwargs, run, label)


def _check_run_keys(run: dict, where: str) -> None:
    warmup = run.get("warmup_steps", 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"{where}: warmup_steps must be an int >= 0, got {warmup!r}")
    schedule = run.get("schedule", "constant")
    if not (callable(schedule) or schedule in SCHEDULES):
        raise ValueError(
            f"{where}: schedule must be one of {SCHEDULES} or a callable "
            f"optimizer -> LRScheduler, got {schedule!r}"
        )
    clip = run.get("clip_grad_norm")
    if clip is not None and (isinstance(clip, bool) or not (isinstance(clip, (int, float)) and clip > 0)):
        raise ValueError(f"{where}: clip_grad_norm must be a number > 0, got {clip!r}")
    seed = run.get("init_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"{where}: init_seed must be an int, got {seed!r}")


def _label(name: str, kwargs: dict, run: dict) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}"
        if isinstance(value, (tuple, list)):
            return "(" + ",".join(fmt(v) for v in value) + ")"
        return getattr(value, "__name__", str(value))

    parts = [name]
    if name == "SGD" and kwargs.get("momentum"):
        parts[0] = "SGD-Nesterov" if kwargs.get("nesterov") else "SGD-momentum"
    parts += [f"{k}={fmt(v)}" for k, v in {**kwargs, **run}.items()
              if not (name == "SGD" and k == "nesterov")]
    return " ".join(parts)


def make_configs(specs) -> list[Config]:
    configs = [make_config(spec, i) for i, spec in enumerate(specs)]
    if not configs:
        raise ValueError("no configurations to train")
    return configs


# ----- search spaces ---------------------------------------------------------------------


def grid(*bases: dict, **axes) -> list[dict]:
    """The cartesian product of ``axes`` (name -> list of values), applied to
    each base configuration (default: one empty base, so ``optimizer`` must
    be an axis)::

        grid({"optimizer": "Adam"}, {"optimizer": "SGD", "momentum": 0.9},
             lr=[1e-3, 1e-2, 1e-1])   # 6 configurations
    """
    bases = bases or ({},)
    names = list(axes)
    for name, values in axes.items():
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise TypeError(f"grid: axis {name!r} must be a list of values, got {values!r}")
    return [
        {**base, **dict(zip(names, values))}
        for base in bases
        for values in itertools.product(*(list(axes[n]) for n in names))
    ]


@dataclass(frozen=True)
class Distribution:
    """A distribution to draw one hyperparameter from (``random_configs``)."""

    kind: str
    args: tuple

    def sample(self, rng: _random.Random) -> Any:
        if self.kind == "loguniform":
            low, high = self.args
            return math.exp(rng.uniform(math.log(low), math.log(high)))
        if self.kind == "uniform":
            return rng.uniform(*self.args)
        return self.args[rng.randrange(len(self.args))]


def loguniform(low: float, high: float) -> Distribution:
    if not 0 < low <= high:
        raise ValueError(f"loguniform needs 0 < low <= high, got {low}, {high}")
    return Distribution("loguniform", (float(low), float(high)))


def uniform(low: float, high: float) -> Distribution:
    if not low <= high:
        raise ValueError(f"uniform needs low <= high, got {low}, {high}")
    return Distribution("uniform", (float(low), float(high)))


def choice(values) -> Distribution:
    values = tuple(values)
    if not values:
        raise ValueError("choice needs at least one value")
    return Distribution("choice", values)


def random_configs(n: int, *bases: dict, seed: int = 0, **space) -> list[dict]:
    """``n`` configurations drawn from ``space`` (name -> Distribution, or a
    fixed value), round-robin over the base configurations; the same seed
    gives the same list::

        random_configs(16, {"optimizer": "AdamW"}, lr=loguniform(1e-4, 1e-1),
                       weight_decay=choice([0.0, 0.01, 0.1]), seed=0)
    """
    if n < 1:
        raise ValueError(f"random_configs needs n >= 1, got {n}")
    bases = bases or ({},)
    rng = _random.Random(seed)
    out = []
    for i in range(n):
        config = dict(bases[i % len(bases)])
        for name, value in space.items():
            config[name] = value.sample(rng) if isinstance(value, Distribution) else value
        out.append(config)
    return out


def lr_range(base: dict, low: float = 1e-5, high: float = 1.0, k: int = 16) -> list[dict]:
    """``k`` copies of ``base`` with log-spaced learning rates from ``low``
    to ``high``: the learning-rate range test (Smith, 2017), with every rate
    trained for the whole run instead of one rate per step."""
    if k < 1 or not 0 < low <= high:
        raise ValueError(f"lr_range needs k >= 1 and 0 < low <= high, got {k}, {low}, {high}")
    if k == 1:
        return [{**base, "lr": low}]
    ratio = math.log(high / low) / (k - 1)
    return [{**base, "lr": low * math.exp(ratio * i) if i < k - 1 else high} for i in range(k)]


def json_value(value: Any) -> Any:
    """A configuration value as JSON can hold it (dtypes and callables as
    their names)."""
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [json_value(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if callable(value):
        return getattr(value, "__name__", repr(value))
    return value


ScheduleFactory = Callable[[torch.optim.Optimizer], Any]
