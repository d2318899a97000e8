"""Throughput benchmark: fused_optim against torch.optim (and DeepSpeed on CPU).

Run ``python -m fused_optim.bench --help`` for the options.

Method (benchmarks/README.md says how to run and read it):

* Every implementation gets its own parameters, filled with the same random
  (never zero) values, and gradients set once (``p.grad = random``) and reused
  by every step (AMP steps unscale them in place: the scale alternates
  between 2 and 1/2, so they stay where they were). Only ``optimizer.step()``
  is timed: ``time.perf_counter`` on CPU; on CUDA a pair of CUDA events
  around the step, which starts on an idle stream. Gradient generation and
  ``zero_grad`` are never in the timed region.
* Each implementation first runs a few warm-up steps (lazy state, first-touch
  allocation, extension load). Then the implementations are *interleaved*
  (A B C D, B C D A, ...) for ``--repeats`` rounds, so that drifts of a shared,
  noisy machine hit all of them alike, and the *median* step time is reported.
* Caches start cold, as in training, where forward and backward run between
  two steps: the reference pass below runs once per round, so it streams
  through the caches between any two steps on the same parameters. On CUDA,
  when a parameter set is small enough to live in L2 (50 MB on H100/H200),
  each implementation also rotates among several parameter sets.
* Precisions (``--precisions``): fused_optim runs the param dtype and the
  mixed-precision options named (master weights, state dtype, stochastic
  rounding, AMP); the torch.optim peers run the same param dtype with
  torch's own behaviour (state in the param dtype, no master weights), the
  closest thing torch has, so ``peer/ours`` then compares two different
  amounts of work: the tables say what each ran. With AMP, optimizers whose
  step unscales (``_step_supports_amp_scaling``) get GradScaler's
  ``grad_scale``/``found_inf``; the others get GradScaler's separate
  unscale pass, timed with their step.
* Throughput is bytes moved per step (the byte budget,
  ``bytes_per_element``: the bytes an ideal single pass over the param,
  grad, master weights and state, at their dtypes, must read and write)
  divided by the step time, and is shown as a fraction of a reference
  bandwidth: an in-place ``mul_`` over a 512 MiB buffer on CPU, a 512 MiB
  device-to-device copy on CUDA, read + write counted. The reference pass is
  one more entry of the interleaved rounds, so each fraction compares
  measurements taken under the same conditions (shared machines drift);
  the per-round fraction pairs each step with the reference pass of its own
  round, for machines whose bandwidth changes level within a block.
  The load average is recorded: other work on the machine skews everything.
* ``peer/ours`` is the peer's median step time divided by fused_optim's:
  above 1 means fused_optim is faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

# --------------------------------------------------------------------------
# What is measured
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    class_name: str  # same name in torch.optim and fused_optim
    kwargs: dict  # hyperparameters given to every implementation
    state_tensors: int  # state tensors per param, each read and written once per step
    torch_has_fused: bool  # torch.optim.X accepts fused=True


OPTIMIZERS = {
    # fp32 byte budgets, from bytes_per_element below:
    # SGD with momentum, Adagrad, RMSprop 20; Adam, AdamW 28.
    "sgd": OptimizerSpec("SGD", {"lr": 1e-3, "momentum": 0.9}, 1, True),
    "adagrad": OptimizerSpec("Adagrad", {"lr": 1e-2}, 1, True),
    # No momentum, not centered: square_avg only (centered adds grad_avg,
    # momentum adds momentum_buffer).
    "rmsprop": OptimizerSpec("RMSprop", {"lr": 1e-3}, 1, False),
    "adam": OptimizerSpec("Adam", {"lr": 1e-3}, 2, True),
    "adamw": OptimizerSpec("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, 2, True),
}

IMPLS = ("fused_optim", "torch-fused", "torch-foreach", "torch-forloop", "deepspeed")
OURS = IMPLS[0]
PEERS = IMPLS[1:]

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclasses.dataclass(frozen=True)
class Precision:
    """Param dtype and fused_optim's mixed-precision options for one run.

    The torch.optim peers run the same param dtype without the options
    torch.optim lacks (master weights, a state dtype other than the param's,
    stochastic rounding): see ``torch_equivalent``.
    """

    name: str
    param_dtype: torch.dtype
    master_weights: bool = False
    state_dtype: torch.dtype | None = None  # None: the param dtype (float32 with master weights)
    stochastic_rounding: bool = False
    # GradScaler's grad_scale/found_inf handed to the step: the gradient is
    # unscaled in the step and written back.
    amp: bool = False

    @property
    def resolved_state_dtype(self) -> torch.dtype:
        if self.state_dtype is not None:
            return self.state_dtype
        return torch.float32 if self.master_weights else self.param_dtype

    def ours_kwargs(self) -> dict:
        """Constructor keywords of fused_optim's classes for this precision."""
        kwargs = {}
        if self.master_weights:
            kwargs["master_weights"] = True
        if self.state_dtype is not None:
            kwargs["state_dtype"] = self.state_dtype
        if self.stochastic_rounding:
            kwargs["stochastic_rounding"] = True
        return kwargs

    def torch_equivalent(self) -> "Precision":
        """What torch.optim runs for this precision: same params (and AMP),
        state in the param dtype, no master weights, round-to-nearest."""
        return Precision(f"torch {DTYPE_NAMES[self.param_dtype]}", self.param_dtype, amp=self.amp)

    def describe(self) -> str:
        parts = [f"{DTYPE_NAMES[self.param_dtype]} params"]
        if self.master_weights:
            parts.append("fp32 master")
        parts.append(f"{DTYPE_NAMES[self.resolved_state_dtype]} state")
        if self.stochastic_rounding:
            parts.append("stochastic rounding")
        if self.amp:
            parts.append("AMP")
        return ", ".join(parts)


PRECISIONS = {
    p.name: p
    for p in (
        Precision("fp32", torch.float32),
        Precision("bf16", torch.bfloat16),
        Precision("fp32-state-bf16", torch.float32, state_dtype=torch.bfloat16),
        Precision("bf16-state-fp32", torch.bfloat16, state_dtype=torch.float32),
        Precision("bf16-master", torch.bfloat16, master_weights=True),
        Precision("bf16-master-state-bf16", torch.bfloat16, master_weights=True,
                  state_dtype=torch.bfloat16),
        Precision("bf16-sr", torch.bfloat16, stochastic_rounding=True),
        Precision("fp32-amp", torch.float32, amp=True),
        Precision("bf16-master-amp", torch.bfloat16, master_weights=True, amp=True),
    )
}
# Named sets for --precisions.
PRECISION_SETS = {
    # bf16 params with every option, with fp32 and plain bf16 for reference.
    "mixed": ["fp32", "bf16", "bf16-master", "bf16-master-state-bf16", "bf16-state-fp32",
              "bf16-sr", "fp32-state-bf16"],
    "amp": ["fp32-amp", "bf16-master-amp"],
}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_element(spec: OptimizerSpec, precision: Precision) -> int:
    """Bytes one ideal single pass moves per param element.

    The gradient (in the param dtype) is read, and written back once more when
    the step unscales it (AMP). Each state tensor is read and written. The
    param is read and written; with master weights the fp32 master is read
    and written instead and the param is only written.
    Adam fp32: 4 + (4 + 4) + 2 * (4 + 4) = 28; bf16 params with fp32 master
    and fp32 state: 2 + (4 + 4 + 2) + 2 * (4 + 4) = 28; bf16: 14.
    """
    param = element_size(precision.param_dtype)
    grad = param * (2 if precision.amp else 1)
    if precision.master_weights:
        weights = 2 * element_size(torch.float32) + param
    else:
        weights = 2 * param
    state = 2 * spec.state_tensors * element_size(precision.resolved_state_dtype)
    return grad + weights + state


def memory_per_element(spec: OptimizerSpec, precision: Precision) -> int:
    """Bytes held per param element: param, grad, master copy, state."""
    param = element_size(precision.param_dtype)
    master = element_size(torch.float32) if precision.master_weights else 0
    return 2 * param + master + spec.state_tensors * element_size(precision.resolved_state_dtype)


# Why powers of two: dividing the gradients by them is exact, and alternating
# 2 and 1/2 keeps them where they started (never zero, never denormal) over
# any number of steps.
AMP_SCALES = (2.0, 0.5)

L2_BYTES = 50 * 2**20  # H100/H200 L2; the device's own value is used when known
# Why 4x: one step streams its whole working set; after 4x L2 of other data,
# nothing of a parameter set is left in L2 when its turn comes again.
L2_FLUSH_FACTOR = 4
MAX_ROTATION = 32

# Why 512 MiB: 10x any L2/L3 here, and a pass takes long enough (~20 ms CPU,
# ~0.3 ms H100) for the timer to be exact; small next to a 1B-param workload.
BANDWIDTH_BUFFER_BYTES = 512 * 2**20
PROBE = "bandwidth"  # the reference pass's entry in the interleaved rounds

# Load average per CPU above which the run is flagged as noisy.
BUSY_LOAD = 0.5

DEFAULT_REPEATS = {"cpu": 45, "cuda": 51}  # CPU: the default run takes ~2 min on 2 cores
DEFAULT_WARMUP = 3


# --------------------------------------------------------------------------
# Workloads: shapes only; tensors are made per implementation
# --------------------------------------------------------------------------


@dataclasses.dataclass
class GroupSpec:
    shapes: list[tuple[int, ...]]
    lr_scale: float = 1.0
    weight_decay: float | None = None  # None: the optimizer's own default


@dataclasses.dataclass
class Workload:
    name: str
    groups: list[GroupSpec]

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for g in self.groups for s in g.shapes)

    @property
    def num_tensors(self) -> int:
        return sum(len(g.shapes) for g in self.groups)


def large_workload(device: str, scale: float) -> Workload:
    """~50M params (CPU) or ~1B (CUDA) in 200 tensors of varied sizes."""
    total = (50e6 if device == "cpu" else 1e9) * scale
    count = 200
    rng = torch.Generator().manual_seed(0)
    # Sizes spread over [0.5, 1.5] x mean, multiples of 16: no two alike.
    factors = 0.5 + torch.rand(count, generator=rng)
    sizes = (factors / factors.sum() * total / 16).round().clamp(min=1) * 16
    return Workload("large", [GroupSpec([(int(n),) for n in sizes])])


def many_small_workload(device: str, scale: float) -> Workload:
    """~2000 tensors of 256 to 4096 elements (LayerNorm/bias-heavy models)."""
    count = max(1, round(2000 * scale))
    rng = torch.Generator().manual_seed(1)
    log_sizes = torch.empty(count).uniform_(math.log(256), math.log(4096), generator=rng)
    return Workload("many-small", [GroupSpec([(int(n),) for n in log_sizes.exp()])])


def many_groups_workload(device: str, scale: float) -> Workload:
    """A GPT-like model in 26 param groups with layer-wise LR decay.

    Each of the 12 layers has a decay group (matrices) and a no-decay group
    (biases, LayerNorm); the embeddings and the final LayerNorm have their own.
    LR of layer i is lr * 0.9 ** (13 - i), embeddings 0.9 ** 13.
    """
    layers, lr_decay, weight_decay = 12, 0.9, 1e-2
    d0, vocab0, ctx = (256, 8192, 512) if device == "cpu" else (1024, 50304, 2048)
    # Both sides of the matrices grow with sqrt(scale): elements grow with scale.
    d = max(64, round(d0 * math.sqrt(scale) / 64) * 64)
    vocab = max(64, round(vocab0 * math.sqrt(scale)))
    groups = [GroupSpec([(vocab, d), (ctx, d)], lr_decay ** (layers + 1), 0.0)]
    for i in range(1, layers + 1):
        lr_scale = lr_decay ** (layers + 1 - i)
        matrices = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
        vectors = [(d,), (d,), (3 * d,), (d,), (d,), (d,), (4 * d,), (d,)]
        groups.append(GroupSpec(matrices, lr_scale, weight_decay))
        groups.append(GroupSpec(vectors, lr_scale, 0.0))
    groups.append(GroupSpec([(d,), (d,)], 1.0, 0.0))
    return Workload("many-groups", groups)


WORKLOADS = {
    "large": large_workload,
    "many-small": many_small_workload,
    "many-groups": many_groups_workload,
}


@dataclasses.dataclass
class Block:
    """One optimizer on one workload in one precision: the unit timed side by side."""

    optimizer: str
    workload: Workload
    precision_name: str

    @property
    def spec(self) -> OptimizerSpec:
        return OPTIMIZERS[self.optimizer]

    @property
    def precision(self) -> Precision:
        return PRECISIONS[self.precision_name]

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.param_dtype

    @property
    def label(self) -> str:
        return f"{self.optimizer} {self.workload.name} {self.precision_name}"

    def precision_of(self, impl: str) -> Precision:
        """The precision `impl` runs: ours as asked, the peers torch.optim's."""
        return self.precision if impl == OURS else self.precision.torch_equivalent()


def bytes_per_step(spec: OptimizerSpec, workload: Workload, precision: Precision) -> float:
    return workload.numel * bytes_per_element(spec, precision)


# --------------------------------------------------------------------------
# Tensors and optimizers
# --------------------------------------------------------------------------


def fill_random(tensors: list[torch.Tensor], seed: int) -> None:
    """Same seed, same values, on any device: uniform in [-1, 1), never zeros."""
    generator = torch.Generator(device=tensors[0].device).manual_seed(seed)
    for t in tensors:
        t.uniform_(-1.0, 1.0, generator=generator)


class ParamSet:
    """One copy of a workload's params, with grads set once and kept."""

    def __init__(self, workload: Workload, dtype: torch.dtype, device: str, seed: int):
        self.seed = seed
        self.groups = [
            [torch.empty(s, dtype=dtype, device=device) for s in g.shapes]
            for g in workload.groups
        ]
        self.params = [p for group in self.groups for p in group]
        self.grads = [torch.empty_like(p) for p in self.params]
        fill_random(self.grads, seed + 1)
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        self.grads_written = False  # an AMP step unscaled the grads in place

    def reset(self) -> None:
        """Back to the initial values, so that every block starts the same."""
        fill_random(self.params, self.seed)
        if self.grads_written:
            fill_random(self.grads, self.seed + 1)
            self.grads_written = False


class ParamPool:
    """ParamSets of one workload and dtype, made on first use, kept across optimizers.

    Set k of every implementation has the same values (same seed).
    """

    def __init__(self, workload: Workload, dtype: torch.dtype, device: str):
        self.workload, self.dtype, self.device = workload, dtype, device
        self.sets: dict[tuple[str, int], ParamSet] = {}

    def get(self, impl: str, k: int) -> ParamSet:
        if (impl, k) not in self.sets:
            self.sets[(impl, k)] = ParamSet(self.workload, self.dtype, self.device, seed=1000 * k)
        param_set = self.sets[(impl, k)]
        param_set.reset()
        return param_set


def param_groups(spec: OptimizerSpec, workload: Workload, param_set: ParamSet) -> list[dict]:
    groups = []
    for group_spec, params in zip(workload.groups, param_set.groups):
        group = {"params": params, "lr": spec.kwargs["lr"] * group_spec.lr_scale}
        if group_spec.weight_decay is not None:
            group["weight_decay"] = group_spec.weight_decay
        groups.append(group)
    return groups


def optimizer_class(impl: str, spec: OptimizerSpec, ours_module) -> tuple[type, dict]:
    """The class to build for `impl`, and its implementation-selecting kwargs."""
    if impl == OURS:
        return getattr(ours_module, spec.class_name), {}
    if impl == "deepspeed":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam, {"adamw_mode": spec.class_name == "AdamW"}
    cls = getattr(torch.optim, spec.class_name)
    if impl == "torch-fused":
        return cls, {"fused": True}
    if impl == "torch-foreach":
        return cls, {"foreach": True}
    extra = {"foreach": False}
    if spec.torch_has_fused:
        extra["fused"] = False
    return cls, extra


def make_optimizer(
    impl, spec, workload, param_set, ours_module, precision
) -> torch.optim.Optimizer:
    cls, impl_kwargs = optimizer_class(impl, spec, ours_module)
    if impl == OURS:
        impl_kwargs = {**impl_kwargs, **precision.ours_kwargs()}
    return cls(param_groups(spec, workload, param_set), **spec.kwargs, **impl_kwargs)


def amp_step(optimizer, param_set: ParamSet) -> Callable[[], object]:
    """One AMP step as torch.amp.GradScaler.step makes it for this optimizer.

    Optimizers whose step unscales (``_step_supports_amp_scaling``: ours and
    torch's fused ones) get GradScaler's ``grad_scale``/``found_inf``
    attributes; the others get GradScaler's separate unscale pass
    (``torch._amp_foreach_non_finite_check_and_unscale_``, in place) before
    the step. GradScaler's own inf check and its bookkeeping are not timed.
    The scale alternates between AMP_SCALES.
    """
    device = param_set.params[0].device
    found_inf = torch.zeros((), device=device)
    scales = [torch.full((), s, device=device) for s in AMP_SCALES]
    inverse_scales = [torch.full((), 1.0 / s, device=device) for s in AMP_SCALES]
    calls = [0]
    param_set.grads_written = True
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = found_inf

        def step():
            optimizer.grad_scale = scales[calls[0] % 2]
            calls[0] += 1
            return optimizer.step()

        step.amp_path = "unscaled in the step"
    else:
        grads = param_set.grads

        def step():
            inverse = inverse_scales[calls[0] % 2]
            calls[0] += 1
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inverse)
            return optimizer.step()

        step.amp_path = "GradScaler's unscale pass, then the step"
    return step


class TorchFusedAsOurs:
    """Stand-in for fused_optim while it does not import (--ours torch-fused)."""

    def __getattr__(self, class_name):
        cls = getattr(torch.optim, class_name)
        fast = {"foreach": True} if class_name == "RMSprop" else {"fused": True}
        return lambda params, **kwargs: cls(params, **fast, **kwargs)


def load_ours(which: str):
    if which == "torch-fused":
        return TorchFusedAsOurs()
    return importlib.import_module("fused_optim")


def deepspeed_available() -> bool:
    try:
        importlib.import_module("deepspeed.ops.adam")
        return True
    except Exception:  # ImportError, or a broken install raising anything else
        return False


def impls_for(spec, device, precision, requested, notes) -> list[str]:
    """The implementations to time for one optimizer, with notes on those left out."""
    impls = []
    for impl in requested:
        reason = None
        if impl == "torch-fused" and not spec.torch_has_fused:
            reason = f"torch.optim.{spec.class_name} has no fused=True"
        elif impl == "deepspeed":
            if device != "cpu" or spec.class_name not in ("Adam", "AdamW"):
                continue  # not a peer here: no note
            if not deepspeed_available():
                reason = "deepspeed not importable: DeepSpeedCPUAdam skipped"
            elif precision.name != "fp32":
                reason = "DeepSpeedCPUAdam timed for fp32 only"
        if reason is None:
            impls.append(impl)
        elif reason not in notes:
            notes.append(reason)
    return impls


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


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
            src = torch.empty(BANDWIDTH_BUFFER_BYTES // 4, device=device)
            dst = torch.empty_like(src)
            fill_random([src], 0)
            self.passes = [lambda: dst.copy_(src)]
            self.bytes_moved = 2 * src.nbytes
            self.description = "512 MiB device-to-device copy, read + write counted"

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


def interleaved_times(entries: dict[str, list[Callable]], repeats: int, timer) -> dict:
    """Time rounds A B C D, B C D A, C D A B, ...: each entry once per round.

    An entry is a list of equivalent calls (one optimizer's step per rotated
    param set) used in turn. Returns the times of each entry, in seconds.
    """
    order = list(entries)
    times = {name: [] for name in order}
    for r in range(repeats):
        shift = r % len(order)
        for name in order[shift:] + order[:shift]:
            calls = entries[name]
            times[name].append(timer(calls[r % len(calls)]))
    return times


# --------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------


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
    times_s: list[float]
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


def warmed_up_steps(impl, block, pool, rotation, warmup, ours_module) -> list[Callable]:
    """Build one implementation's optimizers and run their warm-up steps."""
    steps = []
    for k in range(rotation):
        param_set = pool.get(impl, k)
        optimizer = make_optimizer(
            impl, block.spec, block.workload, param_set, ours_module, block.precision
        )
        step = amp_step(optimizer, param_set) if block.precision.amp else optimizer.step
        for _ in range(warmup):
            step()
        steps.append(step)
    return steps


def prepare_entries(block, pool, impls, args, ours_module, notes) -> dict[str, list[Callable]]:
    """The warmed-up steps of every implementation that works; notes the others.

    Without fused_optim's steps there is nothing to compare: the peers are
    then not timed either.
    """
    rotation = rotation_count(block, args.device)
    entries = {}
    for impl in impls:
        try:
            entries[impl] = warmed_up_steps(impl, block, pool, rotation, args.warmup, ours_module)
        except Exception as error:  # one broken implementation must not end the run
            note = f"{impl} failed on {block.label}: {type(error).__name__}: {error}"
            notes.append(note)
            log(note)
            free_memory(args.device)
            if impl == OURS:
                return {}
    return entries


def config_of(block: Block, impl: str, steps: list[Callable]) -> str:
    """What `impl` ran in `block`, in words."""
    config = block.precision_of(impl).describe()
    amp_path = getattr(steps[0], "amp_path", None)
    return f"{config} ({amp_path})" if amp_path else config


def measure_block(block, pool, impls, args, ours_module, probe, notes) -> list[Result]:
    """Time every implementation of one block, interleaved with the reference pass."""
    entries = prepare_entries(block, pool, impls, args, ours_module, notes)
    if not entries:
        return []
    configs = {impl: config_of(block, impl, steps) for impl, steps in entries.items()}
    entries[PROBE] = probe.passes
    times = interleaved_times(entries, args.repeats, timer_for(args.device))
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
        result.summarize(ours_median)
    return results


def progress_line(index: int, total: int, block: Block, results: list[Result], seconds) -> str:
    parts = [
        f"{r.impl} {r.median_s * 1e3:.2f} ms"
        + (f" ({r.peer_over_ours:.2f}x)" if r.impl != OURS and r.peer_over_ours else "")
        for r in results
    ]
    if results:
        parts.append(f"ref {results[0].bandwidth_gb_per_s:.0f} GB/s")
    return (
        f"[{index}/{total}] {block.label} ({seconds:.1f} s): " + (" | ".join(parts) or "nothing ran")
    )


def run_all(args, ours_module, probe, notes) -> list[Result]:
    # Precisions with the same param dtype are adjacent, so their blocks share
    # one ParamPool (made once per workload and param dtype).
    precisions = sorted(args.precisions, key=lambda n: PRECISIONS[n].param_dtype != torch.float32)
    plan = [(w, p, o) for w in args.workloads for p in precisions for o in args.optimizers]
    results, pool = [], None
    for index, (workload_name, precision_name, optimizer) in enumerate(plan, 1):
        block_start = time.perf_counter()
        block = Block(optimizer, WORKLOADS[workload_name](args.device, args.scale), precision_name)
        if pool is None or (pool.workload.name, pool.dtype) != (workload_name, block.dtype):
            pool = None  # free the previous workload's tensors first
            free_memory(args.device)
            pool = ParamPool(block.workload, block.dtype, args.device)
        impls = impls_for(block.spec, args.device, block.precision, args.impls, notes)
        try:
            block_results = measure_block(block, pool, impls, args, ours_module, probe, notes)
        except torch.OutOfMemoryError:
            block_results = None
        if block_results is None:  # outside `except`: its traceback pins the tensors
            notes.append(f"{block.label}: out of memory while timing, skipped")
            log(f"[{index}/{len(plan)}] {notes[-1]}")
            free_memory(args.device)
            continue
        results.extend(block_results)
        seconds = time.perf_counter() - block_start
        log(progress_line(index, len(plan), block, block_results, seconds))
    return results


def free_memory(device: str) -> None:
    gc.collect()
    if device != "cpu":
        torch.cuda.empty_cache()


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Run metadata
# --------------------------------------------------------------------------


def git_output(args: list[str], cwd: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def git_commit() -> str | None:
    """Short commit of the checkout this package (else the working directory) is in."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for where in (package_parent, os.getcwd()):
        try:
            head = git_output(["rev-parse", "--short", "HEAD"], where)
            dirty = git_output(["status", "--porcelain", "--untracked-files=no"], where)
        except (OSError, subprocess.SubprocessError):
            continue
        return head + ("-dirty" if dirty else "")
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()}
    if device != "cpu":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> float | None:
    """1-minute load average (runnable processes), None where unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_metadata(args, probe, results, notes, elapsed, load_before, commit) -> dict:
    references = [r.bandwidth_gb_per_s for r in results]
    return {
        "command": shlex.join(["python", "-m", "fused_optim.bench", *sys.argv[1:]]),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "ours": args.ours,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "scale": args.scale,
        "precisions": args.precisions,
        "bandwidth_reference": probe.description,
        "bandwidth_gb_per_s_median": statistics.median(references) if references else None,
        "elapsed_s": elapsed,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "notes": notes,
    }


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def fmt_number(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def console_table(results: list[Result]) -> str:
    width = max([9] + [len(r.precision) for r in results])
    header = (
        f"{'optimizer':<9} {'workload':<11} {'precision':<{width}} {'impl':<13} "
        f"{'B/elem':>6} {'median ms':>10} {'Gelem/s':>8} {'GB/s':>7} {'ref GB/s':>8} "
        f"{'% BW':>6} {'%BW/rd':>6} {'peer/ours':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.optimizer:<9} {r.workload:<11} {r.precision:<{width}} {r.impl:<13} "
            f"{r.bytes_per_step / r.numel:>6g} "
            f"{r.median_s * 1e3:>10.3f} {r.elems_per_s / 1e9:>8.3f} {r.gb_per_s:>7.1f} "
            f"{r.bandwidth_gb_per_s:>8.1f} {r.bandwidth_fraction:>6.0%} "
            f"{r.bandwidth_fraction_per_round:>6.0%} {fmt_ratio(r.peer_over_ours):>9}"
        )
    return "\n".join(lines)


def blocks(results: list[Result]) -> dict[tuple, dict[str, Result]]:
    grouped: dict[tuple, dict[str, Result]] = {}
    for r in results:
        grouped.setdefault((r.optimizer, r.workload, r.precision), {})[r.impl] = r
    return grouped


def peer_config(optimizer: str, precision_name: str) -> str:
    """What the torch.optim peers of a block run, with their byte budget."""
    peer = PRECISIONS[precision_name].torch_equivalent()
    return f"{peer.describe()} ({bytes_per_element(OPTIMIZERS[optimizer], peer)})"


def summary_markdown(results: list[Result]) -> list[str]:
    peers = [p for p in PEERS if any(r.impl == p for r in results)]
    lines = [
        "| optimizer | workload | precision | params | tensors | groups | B/elem | ours ms "
        "| GB/s | ref GB/s | % BW | % BW per round | torch peers ran (B/elem) | "
        + " | ".join(f"vs {p}" for p in peers) + " |",
        "|" + "---|" * (13 + len(peers)),
    ]
    for (optimizer, workload, precision), by_impl in blocks(results).items():
        ours = by_impl.get(OURS)
        if ours is None:
            continue
        ratios = [fmt_ratio(by_impl[p].peer_over_ours) if p in by_impl else "-" for p in peers]
        lines.append(
            f"| {optimizer} | {workload} | {precision} | {ours.numel / 1e6:.1f}M | {ours.tensors} "
            f"| {ours.groups} | {ours.bytes_per_step / ours.numel:g} "
            f"| {ours.median_s * 1e3:.3f} | {ours.gb_per_s:.1f} "
            f"| {ours.bandwidth_gb_per_s:.1f} | {ours.bandwidth_fraction:.0%} "
            f"| {ours.bandwidth_fraction_per_round:.0%} "
            f"| {peer_config(optimizer, precision)} | " + " | ".join(ratios) + " |"
        )
    return lines


def detail_markdown(results: list[Result]) -> list[str]:
    lines = [
        "| optimizer | workload | precision | impl | ran | B/elem | median ms | Gelem/s | GB/s "
        "| ref GB/s | % BW | % BW per round | peer/ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.optimizer} | {r.workload} | {r.precision} | {r.impl} | {r.config} "
            f"| {r.bytes_per_step / r.numel:g} | {r.median_s * 1e3:.3f} "
            f"| {r.elems_per_s / 1e9:.3f} | {r.gb_per_s:.1f} | {r.bandwidth_gb_per_s:.1f} "
            f"| {r.bandwidth_fraction:.0%} | {r.bandwidth_fraction_per_round:.0%} "
            f"| {fmt_ratio(r.peer_over_ours)} |"
        )
    return lines


def precisions_markdown(names: list[str]) -> list[str]:
    """The configurations of a run: our keywords, what the peers ran, byte budgets."""
    lines = [
        "| precision | fused_optim ran | constructor keywords | torch peers ran "
        "| B/elem ours (SGD, Adagrad, RMSprop / Adam, AdamW) | B/elem peers |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        precision = PRECISIONS[name]
        peer = precision.torch_equivalent()
        kwargs = ", ".join(
            f"{k}={'torch.' + str(v).split('.')[-1] if isinstance(v, torch.dtype) else v}"
            for k, v in precision.ours_kwargs().items()
        ) or "(none)"
        if precision.amp:
            kwargs += "; GradScaler's grad_scale/found_inf"
        ours_bytes = "/".join(
            str(bytes_per_element(OPTIMIZERS[o], precision)) for o in ("sgd", "adam")
        )
        peer_bytes = "/".join(str(bytes_per_element(OPTIMIZERS[o], peer)) for o in ("sgd", "adam"))
        lines.append(
            f"| {name} | {precision.describe()} | {kwargs} | {peer.describe()} "
            f"| {ours_bytes} | {peer_bytes} |"
        )
    return lines


def markdown_report(meta: dict, results: list[Result]) -> str:
    machine = meta["machine"]
    where = machine.get("device") or f"{machine['cpu']} ({machine['cpu_count']} CPUs)"
    lines = [
        f"# fused_optim benchmark: {where}",
        "",
        f"- command: `{meta['command']}`",
        f"- commit: `{meta['commit']}`",
        f"- date: {meta['date']}",
        f"- machine: {machine['platform']}; CPU {machine['cpu']}"
        + (f"; {machine['device']} (CUDA {machine['cuda']})" if "device" in machine else ""),
        f"- torch {meta['torch']}, {meta['threads']} threads, device `{meta['device']}`",
        f"- bandwidth reference: {meta['bandwidth_reference']}, timed in every round "
        f"(ref GB/s; median over the run {fmt_number(meta['bandwidth_gb_per_s_median'])} GB/s)",
        f"- {meta['repeats']} interleaved repeats after {meta['warmup']} warm-up steps, "
        f"medians; run took {meta['elapsed_s']:.0f} s; load average before/after "
        f"{fmt_number(meta['load_average_before'])}/{fmt_number(meta['load_average_after'])}",
        "",
        "`vs X` = X's step time / fused_optim's (above 1: fused_optim is faster). "
        "GB/s and % BW use the byte budget (bytes_per_element) of what each "
        "implementation ran: B/elem, bytes read and written per param element. "
        "% BW = median GB/s / median ref GB/s; % BW per round = median over the rounds "
        "of each step's GB/s / the reference pass of the same round.",
        "",
        *(precisions_markdown(meta["precisions"]) + [""] if meta["precisions"] != ["fp32"] else []),
        *summary_markdown(results),
        "",
        "## All measurements",
        "",
        *detail_markdown(results),
    ]
    if meta["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def write_outputs(args, meta: dict, results: list[Result]) -> None:
    if args.json:
        payload = {**meta, "results": [dataclasses.asdict(r) for r in results]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_report(meta, results))


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def name_list(choices):
    def parse(text: str) -> list[str]:
        names = list(choices) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown or text!r}; choose from {', '.join(choices)} or 'all'"
            )
        return names

    return parse


def precision_list(text: str) -> list[str]:
    """--precisions: names and set names, expanded, duplicates dropped."""
    names = []
    for item in (n.strip() for n in text.split(",")):
        if not item:
            continue
        for name in PRECISION_SETS.get(item, list(PRECISIONS) if item == "all" else [item]):
            if name not in PRECISIONS:
                raise argparse.ArgumentTypeError(
                    f"unknown {name!r}; choose from {', '.join(PRECISIONS)}, "
                    f"a set ({', '.join(PRECISION_SETS)}) or 'all'"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise argparse.ArgumentTypeError("no precision given")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fused_optim.bench",
        description="Step throughput of fused_optim vs torch.optim (see the module docstring).",
        epilog="--sweep as the first argument runs the lockstep sweep benchmark instead, with its "
               "own options (python -m fused_optim.bench --sweep --help).",
    )
    parser.add_argument("--optimizers", type=name_list(OPTIMIZERS), default=list(OPTIMIZERS),
                        help="comma-separated, or 'all' (default: all)")
    parser.add_argument("--workloads", type=name_list(WORKLOADS), default=list(WORKLOADS),
                        help="comma-separated, or 'all' (default: all)")
    parser.add_argument("--precisions", "--dtypes", dest="precisions",
                        type=precision_list, default=["fp32"],
                        help="param dtypes and mixed-precision options, comma-separated: "
                             + ", ".join(PRECISIONS)
                             + "; or a set: "
                             + "; ".join(f"{k} = {','.join(v)}" for k, v in PRECISION_SETS.items())
                             + "; or 'all' (default: fp32). fused_optim runs each as named; "
                             "the torch.optim peers run the same param dtype with their own "
                             "defaults (state in the param dtype, no master weights); "
                             "amp hands GradScaler's grad_scale/found_inf to the step")
    parser.add_argument("--impls", type=name_list(IMPLS), default=list(IMPLS),
                        help="implementations to time (default: all that apply)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiplies every workload's number of elements (default: 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps per implementation "
                             f"(default: {DEFAULT_REPEATS['cpu']} CPU, {DEFAULT_REPEATS['cuda']} CUDA)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed steps first (default: {DEFAULT_WARMUP})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--json", metavar="PATH", help="write results and metadata as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write a Markdown report")
    parser.add_argument("--ours", choices=("fused_optim", "torch-fused"), default="fused_optim",
                        help="development only: time torch fused as 'ours'")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if args.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", args.device):
        parser.error("--device must be cpu, cuda or cuda:N")
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch has no CUDA device")
    if args.device == "cuda":
        args.device = f"cuda:{torch.cuda.current_device()}"  # set_device needs an index
    device_kind = "cpu" if args.device == "cpu" else "cuda"
    args.repeats = args.repeats or DEFAULT_REPEATS[device_kind]
    if OURS not in args.impls:
        args.impls.insert(0, OURS)  # ratios are relative to it
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--sweep"]:
        from fused_optim.sweep import bench as sweep_bench

        sweep_bench.main(argv[1:])
        return
    args = parse_args(argv)
    started = time.perf_counter()
    commit = git_commit()  # at the start: the checkout may move during a long run
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        torch.cuda.set_device(args.device)
    ours_module = load_ours(args.ours)
    notes = [] if args.ours == "fused_optim" else ["'fused_optim' rows are torch fused (--ours torch-fused)"]
    log(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads")
    load_before = load_average()
    if load_before is not None and load_before > BUSY_LOAD * (os.cpu_count() or 1):
        notes.append(f"machine busy at start (load average {load_before:.1f}): noisy results")
        log(f"warning: {notes[-1]}")
    probe = BandwidthProbe(args.device)
    results = run_all(args, ours_module, probe, notes)
    meta = run_metadata(
        args, probe, results, notes, time.perf_counter() - started, load_before, commit
    )
    print(console_table(results))
    print()
    print("\n".join(summary_markdown(results)))
    for note in notes:
        print(f"note: {note}")
    print(f"bandwidth reference: {probe.description}; total {meta['elapsed_s']:.0f} s")
    write_outputs(args, meta, results)


if __name__ == "__main__":
    main()
