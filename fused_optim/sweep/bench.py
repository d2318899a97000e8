"""Lockstep benchmark: K configurations trained in lockstep against K
sequential runs with torch.optim, wall time per training step.

Run ``python -m fused_optim.sweep.bench`` (or ``python -m fused_optim.bench
--sweep``, which ``bash scripts/bench.sh --sweep`` runs); ``--help`` lists
the options. The default run takes about 3-5 minutes on 2 cores.

What is measured, for K = 1, 4, 16, 64 and two models of
``fused_optim.sweep.digits`` (``mlp``: 64-64-64-10 with ReLU, ``cnn``),
batches of 64 from the digits data, cross-entropy:

* Configurations: a realistic mix cycling through the seven families of
  ``digits.OPTIMIZER_FAMILIES`` (SGD, momentum, Nesterov, Adagrad, RMSprop,
  Adam, AdamW), each with a learning rate of its own grid (the middle one
  first, then outwards), so every K > 1 mixes optimizer types; K = 1 is
  AdamW with lr 1e-3. Both sides train the same configurations from the same
  initial weights on the same batches for the same number of steps.
* Lockstep step: ``lockstep.backward(x, y); lockstep.update()`` (one batched
  forward and backward for all K: ``baddbmm`` for the MLP, vmap for the
  CNN; one fused_optim call per optimizer type).
* Sequential step: for each of K separate models (copies of the initial
  module), each with its own torch.optim optimizer: ``zero_grad(set_to_none=
  True)``, forward, loss, backward, ``optimizer.step()``.
* Sequential optimizers use torch's fastest CPU implementation, chosen by
  measurement: for each optimizer family, on each model, a calibration
  first trains with every implementation torch has for the class
  (``fused=True`` where torch accepts it on CPU: SGD, Adagrad, Adam, AdamW;
  ``foreach=True``; and the for-loop ``foreach=False``, torch's CPU
  default), interleaved in blocks, timing only ``optimizer.step()``; the
  implementation with the lowest median step time is used. The report
  lists each family's times and the one chosen.
* Timing (the protocol of ``fused_optim/bench/``): both sides are warmed
  up (a step, three steps timed one by one, whose median on the sequential
  side sets the block size unless ``--steps`` does: ~0.15 s of sequential
  training; then one untimed block each), then lockstep blocks and
  sequential blocks alternate within one process (``interleaved_times``:
  A B, B A, ...) for ``--rounds`` rounds, so that drifts of a shared machine
  hit both alike. The load average is recorded; a busy machine is noted.
  Reported per (model, K): the median block time per step of each side
  (ms/step), speed-up = sequential / lockstep, the median over rounds of
  the per-round ratio (each lockstep block against the sequential block
  next to it), and ms per configuration per step.
* Memory: each (model, K, side) runs in a fresh subprocess (``--rss-probe``)
  that imports, loads the data, lowers its peak RSS to its current RSS
  (Linux ``/proc/self/clear_refs``: otherwise a peak while importing can
  hide what training adds), records its peak RSS (the baseline), builds
  the side, trains ``--rss-steps`` steps and records its peak RSS again.
  Reported: the peak in MiB, and how far above the baseline. The peak is
  Linux's VmHWM (``/proc/self/status``), ``ru_maxrss`` elsewhere: in a
  child, Linux's ``ru_maxrss`` is at least the RSS of the parent that
  started it (here, the benchmark's own process).

Targets, on a 2-core CPU (the machine of ``benchmarks/results``), on the
MLP: speed-up >= 1x at K = 1, >= 4x at K = 16, >= 6x at K = 64 (the
``target`` column says whether each was met; the CNN has no target).

Examples::

    python -m fused_optim.sweep.bench                      # ~3-5 min on 2 cores
    python -m fused_optim.sweep.bench --models mlp --ks 1,16,64 \\
        --markdown benchmarks/results/sweep-cpu-$(date +%F).md \\
        --json benchmarks/results/sweep-cpu-$(date +%F).json
    python -m fused_optim.sweep.bench --models mlp --ks 1,4 --rounds 6 --no-rss   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from fused_optim.bench import (
    BUSY_LOAD,
    OPTIMIZERS as BENCH_OPTIMIZERS,
    fmt_number,
    free_memory,
    git_commit,
    interleaved_times,
    load_average,
    log,
    machine_info,
    name_list,
    optimizer_class,
    time_call_cpu,
)
from fused_optim.sweep import digits
from fused_optim.sweep.lockstep import Lockstep
from fused_optim.sweep.results import text_table
from fused_optim.sweep.space import Config, make_config, make_configs
from fused_optim.sweep.trainer import batches

SIDES = ("lockstep", "sequential")
# torch.optim's implementations, named as in fused_optim.bench.IMPLS.
TORCH_IMPLS = ("torch-fused", "torch-foreach", "torch-forloop")
# torch.optim's class name -> its spec in fused_optim.bench (torch_has_fused).
TORCH_SPECS = {spec.class_name: spec for spec in BENCH_OPTIMIZERS.values()}

# MLP speed-up targets on a 2-core CPU: K -> sequential / lockstep.
TARGETS = {"mlp": {1: 1.0, 16: 4.0, 64: 6.0}}

DEFAULT_KS = (1, 4, 16, 64)
DEFAULT_ROUNDS = 50
# Without --steps, a block holds as many steps as fill this much sequential
# training (at least 1): long enough for the timer and for a preemption to
# be one outlier among many, short enough for many rounds.
BLOCK_SECONDS = 0.15
# Warm-up per side: one step, then WARMUP_STEPS steps timed one by one (their
# median sets the block size), then one untimed block.
WARMUP_STEPS = 3
CALIBRATION_STEPS = 200  # per implementation and optimizer family
CALIBRATION_BLOCK = 20
RSS_STEPS = 20
N_BATCHES = 21  # one epoch of the digits training split at batch 64, cycled


# --------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# The two sides
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Calibration: torch's fastest implementation per optimizer family
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Calibration:
    model: str
    family: str
    step_us: dict  # implementation -> median optimizer.step() time, microseconds
    chosen: str


def calibrate(model_name: str, data: Batches, args) -> list[Calibration]:
    """For each family, its middle-lr configuration trained with each torch
    implementation, interleaved in blocks; ``optimizer.step()`` timed."""
    results = []
    rounds = max(1, math.ceil(args.calibration_steps / CALIBRATION_BLOCK))
    for family, base, lrs in FAMILIES:
        (config,) = make_configs([{**base, "lr": lrs[middle_out(len(lrs))[0]]}])
        entries = {}
        for impl in torch_impls(config):
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
        times = interleaved_times(entries, rounds, lambda block: block())
        step_us = {impl: statistics.median(t) * 1e6 for impl, t in times.items()}
        chosen = min(step_us, key=step_us.get)
        results.append(Calibration(model_name, family, step_us, chosen))
        log(f"calibration {model_name} {family}: "
            + ", ".join(f"{impl} {us:.1f} us" for impl, us in step_us.items()) + f" -> {chosen}")
    return results


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


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


def measure(model_name: str, k: int, data: Batches, impls: dict[str, str], args) -> Row:
    configs = make_configs(sweep_configs(k))
    free_memory("cpu")
    sides = {side: build_side(side, model_name, configs, impls, args.seed) for side in SIDES}
    streams = {side: data.stream() for side in SIDES}
    warm_times = {}
    for side, (step, _) in sides.items():  # the first step untimed, then WARMUP_STEPS timed
        step(*next(streams[side]))
        warm_times[side] = statistics.median(
            time_call_cpu(block_of(step, streams[side], 1)) for _ in range(WARMUP_STEPS))
    steps = args.steps or max(1, math.ceil(BLOCK_SECONDS / warm_times["sequential"]))
    entries = {side: [block_of(step, streams[side], steps)] for side, (step, _) in sides.items()}
    for side in SIDES:  # one untimed block each
        entries[side][0]()
    times = interleaved_times(entries, args.rounds, time_call_cpu)
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


# --------------------------------------------------------------------------
# Memory: one fresh process per (model, K, side)
# --------------------------------------------------------------------------


def peak_rss_mib() -> float:
    """This process's peak resident memory: Linux's VmHWM, else ``ru_maxrss``.

    Why not ``ru_maxrss`` on Linux: it is at least the RSS of the process
    that started this one (the kernel keeps the peak of the address space
    that exec replaced), so under a big parent it is the parent's RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Lowers the process's peak RSS (VmHWM) to its current RSS (Linux:
    ``/proc/self/clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_probe(args) -> None:
    """The child's side of the memory measurement: one JSON line on stdout."""
    model_name, k, side = args.rss_probe.split(":")
    if side == "sequential" and not args.impls:
        raise SystemExit("--rss-probe MODEL:K:sequential needs --impls "
                         "(family -> torch implementation, JSON)")
    data = Batches(args.batch_size, args.seed)
    free_memory("cpu")
    import_peak = peak_rss_mib()
    # Without the reset, a peak reached while importing would hide what
    # building and training add.
    reset = reset_peak_rss()
    baseline = peak_rss_mib()
    configs = make_configs(sweep_configs(int(k)))
    step, _ = build_side(side, model_name, configs, json.loads(args.impls or "{}"), args.seed)
    block_of(step, data.stream(), args.rss_steps)()
    print(json.dumps({"baseline": baseline, "peak": peak_rss_mib(), "import_peak": import_peak,
                      "peak_reset": reset}))


def measure_rss(model_name: str, k: int, side: str, impls: dict[str, str], args) -> dict:
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "fused_optim.sweep.bench", "--rss-probe", f"{model_name}:{k}:{side}",
        "--impls", json.dumps(impls), "--threads", str(torch.get_num_threads()),
        "--batch-size", str(args.batch_size), "--seed", str(args.seed),
        "--rss-steps", str(args.rss_steps),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"rss probe {model_name} K={k} {side} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def fmt_rss(row: Row, side: str) -> str:
    if not row.rss_mib:
        return "-"
    rss = row.rss_mib[side]
    return f"{rss['peak']:.0f} (+{rss['peak'] - rss['baseline']:.1f})"


def fmt_target(row: Row) -> str:
    if row.target is None:
        return "-"
    return f">= {row.target:g}x: {'met' if row.target_met else 'MISSED'}"


TABLE_HEADER = [
    "model", "K", "optimizers", "torch impls (sequential)", "steps/block",
    "sequential ms/step", "lockstep ms/step", "speed-up", "speed-up per round",
    "seq ms/config", "lockstep ms/config", "target", "RSS seq MiB (+over baseline)",
    "RSS lockstep MiB (+over baseline)",
]
# The console's columns (the mixes go below the table), under shorter names.
CONSOLE_COLUMNS = {
    0: "model", 1: "K", 4: "steps", 5: "seq ms", 6: "lock ms", 7: "speed-up", 8: "per round",
    9: "seq ms/cfg", 10: "lock ms/cfg", 11: "target", 12: "RSS seq MiB", 13: "RSS lock MiB",
}


def table_cells(row: Row) -> list[str]:
    return [
        row.model, str(row.k), row.optimizers, row.torch_impls, str(row.steps_per_block),
        f"{row.sequential_ms:.3f}", f"{row.lockstep_ms:.3f}", f"{row.speedup:.2f}x",
        f"{row.speedup_per_round:.2f}x", f"{row.sequential_ms_per_config:.3f}",
        f"{row.lockstep_ms_per_config:.3f}", fmt_target(row), fmt_rss(row, "sequential"),
        fmt_rss(row, "lockstep"),
    ]


def console_table(rows: list[Row]) -> str:
    cells = [list(CONSOLE_COLUMNS.values())]
    cells += [[table_cells(r)[i] for i in CONSOLE_COLUMNS] for r in rows]
    lines = [text_table(cells, right=True)]
    lines += ["", "ms: per training step of all K (medians); per round: the median of each "
              "round's ratio; RSS: peak MiB (+ above the baseline after imports and data)"]
    for r in rows:
        lines.append(f"{r.model} K={r.k}: {r.optimizers}; sequential torch: {r.torch_impls}")
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def calibration_cells(calibrations: list[Calibration]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "family"] + [f"{impl} us" for impl in TORCH_IMPLS] + ["chosen"]
    rows = [
        [c.model, c.family]
        + [f"{c.step_us[i]:.1f}" if i in c.step_us else "-" for i in TORCH_IMPLS]
        + [c.chosen]
        for c in calibrations
    ]
    return header, rows


def command_line() -> str:
    """The command as run: ``python -m <the module run as __main__>`` and its arguments."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])


def run_metadata(args, commit, started, load_before, notes) -> dict:
    return {
        "command": command_line(),
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info("cpu"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "models": args.models,
        "ks": args.ks,
        "rounds": args.rounds,
        "steps_per_block": args.steps or f"auto (~{BLOCK_SECONDS} s of sequential training)",
        "batch_size": args.batch_size,
        "calibration_steps": args.calibration_steps,
        "rss_steps": None if args.no_rss else args.rss_steps,
        "elapsed_s": time.perf_counter() - started,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "notes": notes,
    }


def markdown_report(meta: dict, rows: list[Row], calibrations: list[Calibration]) -> str:
    machine = meta["machine"]
    lines = [
        f"# Lockstep sweep benchmark: {machine['cpu']} ({machine['cpu_count']} CPUs)",
        "",
        f"- command: `{meta['command']}`",
        f"- commit: `{meta['commit']}`",
        f"- date: {meta['date']}",
        f"- machine: {machine['platform']}; CPU {machine['cpu']}, {machine['cpu_count']} CPUs",
        f"- torch {meta['torch']}, {meta['threads']} threads, Python {meta['python']}",
        f"- {meta['rounds']} interleaved rounds (lockstep block, sequential block) of "
        f"{meta['steps_per_block']} steps per block, medians; batch {meta['batch_size']}; "
        f"run took {meta['elapsed_s']:.0f} s; load average before/after "
        f"{fmt_number(meta['load_average_before'])}/{fmt_number(meta['load_average_after'])}",
        "",
        "speed-up = sequential ms/step / lockstep ms/step (median block times); "
        "speed-up per round = median over rounds of the ratio of the two blocks of a round. "
        "RSS: peak resident memory of a fresh process that built the side and trained "
        f"{meta['rss_steps']} steps; in parentheses, how far above its resident memory after "
        "the imports and the data (the baseline; the peak is reset there).",
        "",
        *markdown_table(TABLE_HEADER, [table_cells(r) for r in rows]),
        "",
        "## torch.optim implementation per family (calibration)",
        "",
        f"Median `optimizer.step()` time over {meta['calibration_steps']} steps per "
        "implementation, interleaved in blocks; the fastest is what the sequential side runs.",
        "",
        *markdown_table(*calibration_cells(calibrations)),
    ]
    if rows and rows[0].rss_mib:
        baselines = sorted({round(side["baseline"]) for r in rows for side in r.rss_mib.values()})
        listed = ", ".join(map(str, baselines))
        lines += ["", f"RSS baselines (after imports and data): {listed} MiB"]
    if meta["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def write_outputs(args, meta, rows, calibrations) -> None:
    if args.json:
        payload = {
            **meta,
            "calibration": [dataclasses.asdict(c) for c in calibrations],
            "results": [{**dataclasses.asdict(r), "target_met": r.target_met} for r in rows],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_report(meta, rows, calibrations))


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fused_optim.sweep.bench",
        description="Wall time per training step of K configurations in lockstep vs K "
                    "sequential torch.optim runs (see the module docstring).",
    )
    parser.add_argument("--models", type=name_list(digits.MODELS), default=["mlp", "cnn"],
                        help="comma-separated, or 'all' (default: mlp,cnn)")
    parser.add_argument("--ks", type=positive_ints, default=list(DEFAULT_KS),
                        help="numbers of configurations (default: 1,4,16,64)")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                        help=f"interleaved rounds per (model, K) (default: {DEFAULT_ROUNDS})")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per block (default: as many as fill "
                             f"~{BLOCK_SECONDS} s of sequential training)")
    parser.add_argument("--calibration-steps", type=int, default=CALIBRATION_STEPS,
                        help="steps per torch implementation and optimizer family when choosing "
                             f"the fastest (default: {CALIBRATION_STEPS})")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="weights, batches (default: 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--no-rss", action="store_true", help="skip the memory measurement")
    parser.add_argument("--rss-steps", type=int, default=RSS_STEPS,
                        help=f"steps each memory probe trains (default: {RSS_STEPS})")
    parser.add_argument("--json", metavar="PATH", help="write results and metadata as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write a Markdown report")
    # The memory probe's child process: MODEL:K:SIDE, and the sequential
    # side's torch implementation per family (JSON).
    parser.add_argument("--rss-probe", help=argparse.SUPPRESS)
    parser.add_argument("--impls", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("rounds", "steps", "calibration_steps", "batch_size", "rss_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_probe:
        rss_probe(args)
        return
    started = time.perf_counter()
    commit = git_commit()  # at the start: the checkout may move during a long run
    notes: list[str] = []
    load_before = load_average()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if load_before is not None and load_before > BUSY_LOAD * (os.cpu_count() or 1):
        notes.append(f"machine busy at start (load average {load_before:.1f}): noisy results")
        log(f"warning: {notes[-1]}")
    data = Batches(args.batch_size, args.seed)
    rows, calibrations, chosen = [], [], {}
    for model_name in args.models:
        model_calibration = calibrate(model_name, data, args)
        calibrations += model_calibration
        chosen[model_name] = {c.family: c.chosen for c in model_calibration}
        for k in args.ks:
            cell_start = time.perf_counter()
            row = measure(model_name, k, data, chosen[model_name], args)
            rows.append(row)
            log(f"{model_name} K={k} ({time.perf_counter() - cell_start:.1f} s): sequential "
                f"{row.sequential_ms:.3f} ms/step, lockstep {row.lockstep_ms:.3f} ms/step, "
                f"{row.speedup:.2f}x ({row.steps_per_block} steps x {row.rounds} rounds)")
            for side, count in row.non_finite.items():
                if count:
                    notes.append(f"{model_name} K={k}: {count} configurations of the {side} side "
                                 "ended with non-finite weights (trained alike on both sides)")
    if not args.no_rss:
        for row in rows:
            row.rss_mib = {side: measure_rss(row.model, row.k, side, chosen[row.model], args)
                           for side in SIDES}
            log(f"rss {row.model} K={row.k}: sequential {fmt_rss(row, 'sequential')} MiB, "
                f"lockstep {fmt_rss(row, 'lockstep')} MiB")
        if rows and not all(r["peak_reset"] for row in rows for r in row.rss_mib.values()):
            notes.append("the peak RSS could not be reset after the imports: "
                         "peaks while importing may hide what training adds")
    meta = run_metadata(args, commit, started, load_before, notes)
    print(console_table(rows))
    print()
    print("\n".join(markdown_table(*calibration_cells(calibrations))))
    for note in notes:
        print(f"note: {note}")
    print(f"total {meta['elapsed_s']:.0f} s")
    write_outputs(args, meta, rows, calibrations)


if __name__ == "__main__":
    main()
