"""The configurations of a lockstep benchmark run: K of them cycling
through the optimizer families of ``digits.OPTIMIZER_FAMILIES``, each with
a learning rate of its family's grid."""

from __future__ import annotations

from fused_optim.sweep import digits
from fused_optim.sweep.space import Config, make_config

def middle_out(n: int) -> list[int]:
    """0..n-1 ordered from the middle outwards: 5 -> [2, 1, 3, 0, 4]."""
    middle = (n - 1) // 2
    return sorted(range(n), key=lambda i: (abs(i - middle), i))


def family_name(base: dict) -> str:
    """A family's label: the first word of its configurations' names
    (SGD, SGD-momentum, SGD-Nesterov, Adagrad, ...)."""
    return make_config({**base, "lr": 1e-3}).name.split()[0]


FAMILIES = [(family_name(base), base, lrs) for base, lrs in digits.OPTIMIZER_FAMILIES]


def sweep_configs(k: int) -> list[dict]:
    """K configurations: the families in turn, each lap the next lr of the
    family's grid, middle first; K = 1: AdamW at lr 1e-3."""
    if k == 1:
        (base,) = [b for name, b, _ in FAMILIES if name == "AdamW"]
        return [{**base, "lr": 1e-3}]
    configs = []
    for i in range(k):
        _, base, lrs = FAMILIES[i % len(FAMILIES)]
        lap = i // len(FAMILIES)
        configs.append({**base, "lr": lrs[middle_out(len(lrs))[lap % len(lrs)]]})
    return configs


def family_of(config: Config) -> str:
    return config.name.split()[0]


def mix(configs: list[Config]) -> str:
    """'SGD x3, Adam x1': the optimizer types of a run, in order of first use."""
    counts: dict[str, int] = {}
    for config in configs:
        counts[config.optimizer] = counts.get(config.optimizer, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in counts.items())
