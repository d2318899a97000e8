"""What the standalone benchmark scripts (dtensor_step.py, in_backward.py,
step_after_backward.py) share: the optimizers they time, the interleaved
timing loop that docs/benchmarking.md asks for (every implementation timed
in every round, in one process, so that the machine's drift falls on all
alike), and the table of medians they print."""

from __future__ import annotations

import statistics
from typing import Callable

# name -> (class name, in torch.optim and fused_optim alike; its keywords)
OPTIMIZERS = {
    "sgd": ("SGD", {"lr": 1e-3, "momentum": 0.9}),
    "adam": ("Adam", {"lr": 1e-3}),
    "adamw": ("AdamW", {"lr": 1e-3, "weight_decay": 0.01}),
    "adagrad": ("Adagrad", {"lr": 1e-2}),
}


def interleaved_times(steps: dict[str, Callable[[], float]], rounds: int,
                      warmup: int) -> dict[str, list[float]]:
    """{name: the seconds of each kept round}: each round calls every step
    (which times itself and returns its seconds) once, in an order rotated
    by one each round; the first ``warmup`` rounds are not kept."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = steps[name]()
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def print_medians(times: dict[str, list[float]], baseline: str, what: str) -> None:
    """A Markdown table: each implementation's median of ``what`` in us,
    and that median over ``baseline``'s."""
    reference = statistics.median(times[baseline])
    print(f"| implementation | median {what} (us) | / {baseline} |\n|---|---:|---:|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median * 1e6:.0f} | {median / reference:.2f}x |")
