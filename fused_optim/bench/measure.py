"""The run: the plan of blocks, each block's warm-up and interleaved rounds,
and the Result of every implementation in it."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import statistics
import time
from typing import Callable

import torch

from fused_optim.bench.peers import amp_step, clipped_step, impls_for, make_optimizer
from fused_optim.bench.progress import BlockProgress
from fused_optim.bench.specs import DTYPE_NAMES, OURS, PRECISIONS
from fused_optim.bench.timing import (
    PROBE,
    BandwidthProbe,
    interleaved_times,
    rotation_count,
    timer_for,
)
from fused_optim.bench.workloads import WORKLOADS, Block, ParamPool, bytes_per_step


@dataclasses.dataclass
class Result:
    optimizer: str
    workload: str
    precision: str  # the --precisions name of the block
    dtype: str  # param dtype
    config: str  # what this implementation ran (peers: torch.optim's equivalent)
    impl: str
    numel: int
    tensors: int
    groups: int
    bytes_per_step: float
    times_s: list[float]  # per step: each sample's time / steps_per_sample
    bandwidth_gb_per_s: float  # the reference pass, interleaved with these steps
    # The reference pass's bandwidth in each round, in the order of times_s.
    round_bandwidths_gb_per_s: list[float]
    median_s: float = 0.0
    elems_per_s: float = 0.0
    gb_per_s: float = 0.0
    bandwidth_fraction: float = 0.0
    # Median over the rounds of (this round's GB/s / this round's reference):
    # each step is compared with the reference pass run next to it, so a
    # machine whose bandwidth changes mode during a block (this VM switches
    # between about 55 and 85 GB/s) still gives the right fraction.
    bandwidth_fraction_per_round: float = 0.0
    peer_over_ours: float | None = None  # this impl's median / fused_optim's
    steps_per_sample: int = 1  # back-to-back steps in each timed sample

    def summarize(self, ours_median: float | None) -> None:
        self.median_s = statistics.median(self.times_s)
        self.elems_per_s = self.numel / self.median_s
        self.gb_per_s = self.bytes_per_step / self.median_s / 1e9
        self.bandwidth_fraction = self.gb_per_s / self.bandwidth_gb_per_s
        self.bandwidth_fraction_per_round = statistics.median(
            self.bytes_per_step / t / 1e9 / reference
            for t, reference in zip(self.times_s, self.round_bandwidths_gb_per_s)
        )
        if ours_median:
            self.peer_over_ours = self.median_s / ours_median


@dataclasses.dataclass
class Session:
    """What every block of one run shares."""

    args: argparse.Namespace  # the parsed command line: names, device, repeats, warmup, scale
    ours_module: object  # fused_optim, or its stand-in (--ours torch-fused)
    probe: BandwidthProbe
    progress: BlockProgress
    notes: list[str]


def free_memory(device: str) -> None:
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def warmed_up_steps(impl, block, pool, rotation, warmup, ours_module) -> list[Callable]:
    """Build one implementation's optimizers and run their warm-up steps."""
    steps = []
    for k in range(rotation):
        param_set = pool.get(impl, k)
        optimizer = make_optimizer(
            impl, block.spec, block.workload, param_set, ours_module, block.precision
        )
        step = amp_step(optimizer, param_set) if block.precision.amp else optimizer.step
        if block.precision.clip and impl != OURS:
            step = clipped_step(optimizer, param_set)
        for _ in range(warmup):
            step()
        steps.append(step)
    return steps


def prepare_entries(block, pool, impls, session: Session) -> dict[str, list[Callable]]:
    """The warmed-up steps of every implementation that works; notes the others.

    Without fused_optim's steps there is nothing to compare: the peers are
    then not timed either.
    """
    device = session.args.device
    rotation = rotation_count(block, device)
    entries = {}
    for position, impl in enumerate(impls, 1):
        session.progress.phase(f"warm-up {impl} ({position}/{len(impls)})")
        try:
            entries[impl] = warmed_up_steps(
                impl, block, pool, rotation, session.args.warmup, session.ours_module
            )
        except Exception as error:  # one broken implementation must not end the run
            note = f"{impl} failed on {block.label}: {type(error).__name__}: {error}"
            session.notes.append(note)
            session.progress.note(note)
            free_memory(device)
            if impl == OURS:
                return {}
    return entries


def config_of(block: Block, impl: str, steps: list[Callable]) -> str:
    """What `impl` ran in `block`, in words."""
    config = block.precision_of(impl).describe()
    amp_path = getattr(steps[0], "amp_path", None)
    return f"{config} ({amp_path})" if amp_path else config


def measure_block(block, pool, impls, session: Session) -> list[Result]:
    """Time every implementation of one block, interleaved with the reference pass."""
    args, probe = session.args, session.probe
    entries = prepare_entries(block, pool, impls, session)
    if not entries:
        return []
    configs = {impl: config_of(block, impl, steps) for impl, steps in entries.items()}
    timer = timer_for(args.device)
    steps_per_sample = samples_of(entries, args.sample_ms / 1e3, timer)
    entries[PROBE] = probe.passes
    session.progress.begin_rounds(args.repeats)
    times = interleaved_times(
        entries, args.repeats, timer, after_round=session.progress.round_done
    )
    for impl in configs:
        times[impl] = [t / steps_per_sample for t in times[impl]]
    del entries
    free_memory(args.device)  # the optimizer states, before the next block allocates its own
    probe_times = times.pop(PROBE)
    bandwidth = probe.bandwidth(probe_times)
    round_bandwidths = [probe.bytes_moved / t / 1e9 for t in probe_times]
    results = [
        Result(
            block.optimizer, block.workload.name, block.precision_name,
            DTYPE_NAMES[block.dtype], configs[impl], impl,
            block.workload.numel, block.workload.num_tensors, len(block.workload.groups),
            bytes_per_step(block.spec, block.workload, block.precision_of(impl)), impl_times,
            bandwidth / 1e9, round_bandwidths,
        )
        for impl, impl_times in times.items()
    ]
    ours_median = statistics.median(times[OURS]) if OURS in times else None
    for result in results:
        result.steps_per_sample = steps_per_sample
        result.summarize(ours_median)
    return results


def samples_of(entries: dict[str, list[Callable]], sample_s: float, timer) -> int:
    """Makes each entry's calls samples of back-to-back steps lasting at least
    ``sample_s`` for fused_optim's warm step (the same count for every
    implementation, so every sample moves the same bytes); returns the count."""
    if sample_s <= 0 or OURS not in entries:
        return 1
    step = entries[OURS][0]
    warm = statistics.median(timer(step) for _ in range(5))
    count = max(1, math.ceil(sample_s / max(warm, 1e-9)))
    if count > 1:
        # A step timed alone carries the timer's cost and colder caches: a
        # tiny step's estimate was 2x its time back to back, and samples
        # half as long as asked. So the count is set again from samples of
        # that many back-to-back steps.
        burst = statistics.median(timer(_repeated(step, count)) for _ in range(3))
        count = max(count, math.ceil(count * sample_s / max(burst, 1e-9)))
    if count > 1:
        for impl, calls in entries.items():
            entries[impl] = [_repeated(call, count) for call in calls]
    return count


def _repeated(step: Callable, count: int) -> Callable:
    def steps():
        for _ in range(count):
            step()

    steps.amp_path = getattr(step, "amp_path", None)
    return steps


def block_summary_line(position: str, block: Block, results: list[Result], seconds) -> str:
    """`position` ("3/15") and what the block measured, for the log."""
    parts = [
        f"{r.impl} {r.median_s * 1e3:.2f} ms"
        + (f" ({r.peer_over_ours:.2f}x)" if r.impl != OURS and r.peer_over_ours else "")
        for r in results
    ]
    if results:
        parts.append(f"ref {results[0].bandwidth_gb_per_s:.0f} GB/s")
    return (
        f"[{position}] {block.label} ({seconds:.1f} s): " + (" | ".join(parts) or "nothing ran")
    )


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(workload, precision, optimizer) of every block, in the order they run,
    leaving out the (optimizer, precision) pairs of ``args.unbuildable``.

    Precisions with the same param dtype are adjacent, so their blocks share
    one ParamPool (made once per workload and param dtype).
    """
    precisions = sorted(args.precisions, key=lambda n: PRECISIONS[n].param_dtype != torch.float32)
    return [(w, p, o) for w in args.workloads for p in precisions for o in args.optimizers
            if (o, p) not in args.unbuildable]


def run_all(session: Session) -> list[Result]:
    args, notes, progress = session.args, session.notes, session.progress
    blocks = plan(args)
    results, pool = [], None
    for index, (workload_name, precision_name, optimizer) in enumerate(blocks, 1):
        position = f"{index}/{len(blocks)}"
        block_start = time.perf_counter()
        block = Block(optimizer, WORKLOADS[workload_name](args.device, args.scale), precision_name)
        progress.start(f"block {position} {block.label}")
        if pool is None or (pool.workload.name, pool.dtype) != (workload_name, block.dtype):
            pool = None  # free the previous workload's tensors first
            free_memory(args.device)
            pool = ParamPool(block.workload, block.dtype, args.device)
        impls = impls_for(block.spec, args.device, block.precision, args.impls, notes)
        try:
            block_results = measure_block(block, pool, impls, session)
        except torch.OutOfMemoryError:
            block_results = None
        if block_results is None:  # outside `except`: its traceback pins the tensors
            notes.append(f"{block.label}: out of memory while timing, skipped")
            progress.finish(f"[{position}] {notes[-1]}")
            free_memory(args.device)
            continue
        results.extend(block_results)
        seconds = time.perf_counter() - block_start
        progress.finish(block_summary_line(position, block, block_results, seconds))
    return results
