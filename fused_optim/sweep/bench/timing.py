"""Timing: the calibration that picks torch's fastest implementation per
optimizer family, and the interleaved lockstep/sequential blocks of one
(model, K) cell."""

from __future__ import annotations

import dataclasses
import math
import statistics

import torch

from fused_optim.bench import free_memory, interleaved_times, time_call_cpu
from fused_optim.bench.progress import BlockProgress
from fused_optim.sweep import digits
from fused_optim.sweep.bench.configs import FAMILIES, family_of, middle_out, mix, sweep_configs
from fused_optim.sweep.bench.sides import (
    SIDES, Batches, Sequential, block_of, build_side, torch_impls,
)
from fused_optim.sweep.space import Config, make_configs

# MLP speed-up targets on a 2-core CPU: K -> sequential / lockstep.
TARGETS = {"mlp": {1: 1.0, 16: 4.0, 64: 6.0}}
# Without --steps, a block holds as many steps as fill this much sequential
# training (at least 1): long enough for the timer and for a preemption to
# be one outlier among many, short enough for many rounds.
BLOCK_SECONDS = 0.15
# Warm-up per side: one step, then WARMUP_STEPS steps timed one by one (their
# median sets the block size), then one untimed block.
WARMUP_STEPS = 3
CALIBRATION_STEPS = 200  # per implementation and optimizer family
CALIBRATION_BLOCK = 20


@dataclasses.dataclass
class Calibration:
    model: str
    family: str
    step_us: dict  # implementation -> median optimizer.step() time, microseconds
    chosen: str


def calibrate(model_name: str, data: Batches, args,
              progress: BlockProgress) -> list[Calibration]:
    """For each family, its middle-lr configuration trained with each torch
    implementation, interleaved in blocks; ``optimizer.step()`` timed."""
    results = []
    rounds = max(1, math.ceil(args.calibration_steps / CALIBRATION_BLOCK))
    for family, base, lrs in FAMILIES:
        progress.start(f"calibration {model_name} {family}")
        (config,) = make_configs([{**base, "lr": lrs[middle_out(len(lrs))[0]]}])
        entries = {}
        for impl in torch_impls(config):
            progress.phase(f"warm-up {impl}")
            torch.manual_seed(args.seed)
            run = Sequential(digits.MODELS[model_name](), [config], {family: impl})
            stream = data.stream()
            for _ in range(WARMUP_STEPS):
                run.step(*next(stream))

            def block(run=run, stream=stream) -> float:
                times: list[float] = []
                for _ in range(CALIBRATION_BLOCK):
                    run.step(*next(stream), step_times=times)
                return statistics.median(times)

            entries[impl] = [block]
        progress.begin_rounds(rounds)
        times = interleaved_times(entries, rounds, lambda block: block(),
                                  after_round=progress.round_done)
        step_us = {impl: statistics.median(t) * 1e6 for impl, t in times.items()}
        chosen = min(step_us, key=step_us.get)
        results.append(Calibration(model_name, family, step_us, chosen))
        progress.finish(f"calibration {model_name} {family}: "
            + ", ".join(f"{impl} {us:.1f} us" for impl, us in step_us.items()) + f" -> {chosen}")
    return results


@dataclasses.dataclass
class Row:
    model: str
    k: int
    optimizers: str  # the mix of optimizer types
    torch_impls: str  # what the sequential side ran, per class
    steps_per_block: int
    rounds: int
    sequential_ms: float  # median block time / steps, per training step of all K
    lockstep_ms: float
    speedup: float  # sequential_ms / lockstep_ms
    speedup_per_round: float  # median over rounds of the two blocks' ratio
    sequential_ms_per_config: float
    lockstep_ms_per_config: float
    target: float | None
    non_finite: dict  # side -> configurations whose weights went NaN/inf
    sequential_block_s: list[float]
    lockstep_block_s: list[float]
    # side -> {"peak", "baseline", "import_peak": MiB; "peak_reset": bool}
    rss_mib: dict | None = None

    @property
    def target_met(self) -> bool | None:
        return None if self.target is None else self.speedup >= self.target


def impls_summary(configs: list[Config], impls: dict[str, str]) -> str:
    """'SGD fused, Adagrad foreach': the sequential side's implementation per class."""
    used: dict[str, set] = {}
    for config in configs:
        impl = impls[family_of(config)].removeprefix("torch-")
        used.setdefault(config.optimizer, set()).add(impl)
    return ", ".join(f"{name} {'/'.join(sorted(kinds))}" for name, kinds in used.items())


def measure(model_name: str, k: int, data: Batches, impls: dict[str, str], args,
            progress: BlockProgress) -> Row:
    """The (model, K) cell; its caller starts ``progress`` and finishes it
    with the result line."""
    configs = make_configs(sweep_configs(k))
    free_memory("cpu")
    progress.phase("building both sides")
    sides = {side: build_side(side, model_name, configs, impls, args.seed) for side in SIDES}
    streams = {side: data.stream() for side in SIDES}
    warm_times = {}
    for side, (step, _) in sides.items():  # the first step untimed, then WARMUP_STEPS timed
        progress.phase(f"warm-up {side}")
        step(*next(streams[side]))
        warm_times[side] = statistics.median(
            time_call_cpu(block_of(step, streams[side], 1)) for _ in range(WARMUP_STEPS))
    steps = args.steps or max(1, math.ceil(BLOCK_SECONDS / warm_times["sequential"]))
    entries = {side: [block_of(step, streams[side], steps)] for side, (step, _) in sides.items()}
    for side in SIDES:  # one untimed block each
        progress.phase(f"warm-up block {side} ({steps} steps)")
        entries[side][0]()
    progress.begin_rounds(args.rounds)
    times = interleaved_times(entries, args.rounds, time_call_cpu,
                              after_round=progress.round_done)
    seq_ms = statistics.median(times["sequential"]) / steps * 1e3
    lock_ms = statistics.median(times["lockstep"]) / steps * 1e3
    non_finite = {side: sum(not ok for ok in finite()) for side, (_, finite) in sides.items()}
    return Row(
        model_name, k, mix(configs), impls_summary(configs, impls), steps, args.rounds,
        seq_ms, lock_ms, seq_ms / lock_ms,
        statistics.median(s / l for s, l in zip(times["sequential"], times["lockstep"])),
        seq_ms / k, lock_ms / k, TARGETS.get(model_name, {}).get(k), non_finite,
        times["sequential"], times["lockstep"],
    )
