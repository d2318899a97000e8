"""Timers, the bandwidth reference pass, and the interleaved rounds."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from fused_optim.bench.specs import OURS, PEERS, memory_per_element
from fused_optim.bench.workloads import Block, fill_random

L2_BYTES = 50 * 2**20  # H100/H200 L2; the device's own value is used when known
# Why 4x: one step streams its whole working set; after 4x L2 of other data,
# nothing of a parameter set is left in L2 when its turn comes again.
L2_FLUSH_FACTOR = 4
MAX_ROTATION = 32

# Why 512 MiB: 10x any L2/L3 here, and a pass takes long enough (~20 ms CPU)
# for the timer to be exact; small next to a 1B-param workload.
BANDWIDTH_BUFFER_BYTES = 512 * 2**20
# On a GPU, more: a 512 MiB copy ran at 3.2-3.5 TB/s on an H200 while the
# steps of the `large` workload (GBs per step) moved 3.7-3.8 TB/s
# (benchmarks/results/h200-2026-12-04): so short a copy (~0.3 ms) pays its
# ramp-up and tail, and understates the bus. 4 GiB, the size of one `large`
# tensor set, or 1/32 of the device's memory where that is less.
CUDA_BANDWIDTH_BUFFER_BYTES = 4 * 2**30


def cuda_bandwidth_buffer_bytes(device) -> int:
    """The CUDA reference copy's size on ``device`` (see above)."""
    total = torch.cuda.get_device_properties(device).total_memory
    return max(BANDWIDTH_BUFFER_BYTES, min(CUDA_BANDWIDTH_BUFFER_BYTES, total // 32))
PROBE = "bandwidth"  # the reference pass's entry in the interleaved rounds


def time_call_cpu(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_call_cuda(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()  # start from an idle stream: launch cost counts
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def timer_for(device: str) -> Callable[[Callable[[], object]], float]:
    return time_call_cpu if device == "cpu" else time_call_cuda


class BandwidthProbe:
    """The streaming pass whose bandwidth the steps are compared to."""

    def __init__(self, device: str):
        if device == "cpu":
            buf = torch.empty(BANDWIDTH_BUFFER_BYTES // 4)
            fill_random([buf], 0)
            # Alternate x2 and x0.5: exact, so the values never drift.
            self.passes = [lambda: buf.mul_(2.0), lambda: buf.mul_(0.5)]
            self.bytes_moved = 2 * buf.nbytes
            self.description = "in-place mul_ over 512 MiB, read + write counted"
        else:
            size = cuda_bandwidth_buffer_bytes(device)
            src = torch.empty(size // 4, device=device)
            dst = torch.empty_like(src)
            fill_random([src], 0)
            self.passes = [lambda: dst.copy_(src)]
            self.bytes_moved = 2 * src.nbytes
            self.description = f"{size // 2**20} MiB device-to-device copy, read + write counted"

        for run_pass in self.passes * 2:  # first touch, lazy CUDA init
            run_pass()

    def bandwidth(self, times_s: list[float]) -> float:
        """Bytes/s from the pass times of one block."""
        return self.bytes_moved / statistics.median(times_s)


def rotation_count(block: Block, device: str) -> int:
    """How many param sets each implementation cycles through (CUDA only)."""
    if device == "cpu":
        return 1
    footprint = block.workload.numel * max(
        memory_per_element(block.spec, block.precision_of(impl)) for impl in (OURS, PEERS[0])
    )
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or L2_BYTES
    return min(MAX_ROTATION, max(1, math.ceil(L2_FLUSH_FACTOR * l2 / footprint)))


def interleaved_times(
    entries: dict[str, list[Callable]],
    repeats: int,
    timer,
    after_round: Callable[[int], object] | None = None,
) -> dict:
    """Time rounds A B C D, B C D A, C D A B, ...: each entry once per round.

    An entry is a list of equivalent calls (one optimizer's step per rotated
    param set) used in turn. Returns the times of each entry, in seconds.
    ``after_round(rounds_done)`` runs between rounds, outside the timed calls
    (progress reports).
    """
    order = list(entries)
    times = {name: [] for name in order}
    for r in range(repeats):
        shift = r % len(order)
        for name in order[shift:] + order[:shift]:
            calls = entries[name]
            times[name].append(timer(calls[r % len(calls)]))
        if after_round is not None:
            after_round(r + 1)
    return times
