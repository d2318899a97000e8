"""Throughput benchmark: fused_optim against torch.optim (and DeepSpeed on CPU).

Run ``python -m fused_optim.bench --help`` for the options, the names and
the expected run time; benchmarks/README.md says how to run and read it.

The package, a file per job:

* ``specs.py``: optimizers, implementations, precisions, bytes per element
* ``workloads.py``: the workloads (large, many-small, many-groups), the
  blocks, the parameter sets and pools
* ``peers.py``: building each implementation's optimizer and its step
* ``timing.py``: timers, the bandwidth reference pass, interleaved rounds
* ``measure.py``: the run, block by block, and its Results
* ``progress.py``: what the running block has done, on stderr
* ``metadata.py``: the command, commit, machine and load of a run
* ``report.py``, ``plot.py``: the console table, Markdown, JSON and plot
* ``cli.py``, ``__main__.py``: the command line

Method (the protocol):

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
  Progress on stderr is written between rounds, never inside a timed call.
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
  bandwidth: an in-place ``mul_`` over a 512 MiB buffer on CPU, a 4 GiB
  device-to-device copy on CUDA (less on a GPU of under 128 GiB: 1/32 of its
  memory, at least 512 MiB), read + write counted. The reference pass is
  one more entry of the interleaved rounds, so each fraction compares
  measurements taken under the same conditions (shared machines drift);
  the per-round fraction pairs each step with the reference pass of its own
  round, for machines whose bandwidth changes level within a block.
  The load average is recorded: other work on the machine skews everything.
* The commit recorded is the checkout's (``git rev-parse``) when the package
  runs from one, else the one setup.py wrote into ``_build_info.py`` at
  build time, else "unknown"; ``commit_source`` says which.
* ``peer/ours`` is the peer's median step time divided by fused_optim's:
  above 1 means fused_optim is faster.
"""

# The names other modules use (fused_optim.sweep.bench,
# benchmarks/bf16_training.py), importable from the package as before.
from fused_optim.bench.cli import check_output_files, main, name_list, parse_args
from fused_optim.bench.measure import Result, free_memory, run_all
from fused_optim.bench.metadata import (
    BUSY_LOAD,
    commit_and_source,
    git_commit,
    load_average,
    machine_info,
)
from fused_optim.bench.peers import make_optimizer, optimizer_class
from fused_optim.bench.progress import log
from fused_optim.bench.report import fmt_number, fmt_ratio
from fused_optim.bench.specs import (
    IMPLS,
    OPTIMIZERS,
    OURS,
    PEERS,
    PRECISION_SETS,
    PRECISIONS,
    OptimizerSpec,
    Precision,
    bytes_per_element,
)
from fused_optim.bench.timing import interleaved_times, time_call_cpu
from fused_optim.bench.workloads import WORKLOADS, Block, Workload

__all__ = [
    "BUSY_LOAD", "IMPLS", "OPTIMIZERS", "OURS", "PEERS", "PRECISIONS", "PRECISION_SETS",
    "WORKLOADS", "Block", "OptimizerSpec", "Precision", "Result", "Workload",
    "bytes_per_element", "check_output_files", "commit_and_source", "fmt_number", "fmt_ratio",
    "free_memory", "git_commit", "interleaved_times", "load_average", "log", "machine_info", "main",
    "make_optimizer", "name_list", "optimizer_class", "parse_args", "run_all", "time_call_cpu",
]
