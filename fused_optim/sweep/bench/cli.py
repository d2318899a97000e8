"""The command line: ``python -m fused_optim.sweep.bench``."""

from __future__ import annotations

import argparse
import os
import time

import torch

from fused_optim.bench import (
    BUSY_LOAD, check_output_files, commit_and_source, load_average, log, name_list,
)
from fused_optim.bench.progress import BlockProgress
from fused_optim.sweep import digits
from fused_optim.sweep.bench.memory import RSS_STEPS, measure_rss, rss_probe
from fused_optim.sweep.bench.report import (
    calibration_cells, console_table, fmt_rss, markdown_table, run_metadata, write_outputs,
)
from fused_optim.sweep.bench.sides import SIDES, Batches
from fused_optim.sweep.bench.timing import BLOCK_SECONDS, CALIBRATION_STEPS, calibrate, measure

DEFAULT_KS = (1, 4, 16, 64)
DEFAULT_ROUNDS = 50


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
        epilog="With the defaults it takes about 4 minutes on a 2-core CPU (memory probes "
               "included; --no-rss skips them); the time grows with --rounds and --ks. "
               "While a calibration, a (model, K) cell or a memory probe runs, a progress "
               "line on stderr shows its stage and round.",
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
    parser.add_argument("--batch-size", type=int, default=64,
                        help="examples per step, of the digits training split (default: 64)")
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
    train_size = len(digits.load(seed=args.seed)[0][0])
    if args.batch_size > train_size:
        parser.error(f"--batch-size {args.batch_size}: the digits training split holds "
                     f"{train_size} examples")
    check_output_files(parser, {"--json": args.json, "--markdown": args.markdown})
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_probe:
        rss_probe(args)
        return
    started = time.perf_counter()
    commit = commit_and_source()  # at the start: the checkout may move during a long run
    notes: list[str] = []
    load_before = load_average()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if load_before is not None and load_before > BUSY_LOAD * (os.cpu_count() or 1):
        notes.append(f"machine busy at start (load average {load_before:.1f}): noisy results")
        log(f"warning: {notes[-1]}")
    data = Batches(args.batch_size, args.seed)
    progress = BlockProgress()
    rows, calibrations, chosen = [], [], {}
    for model_name in args.models:
        model_calibration = calibrate(model_name, data, args, progress)
        calibrations += model_calibration
        chosen[model_name] = {c.family: c.chosen for c in model_calibration}
        for k in args.ks:
            cell_start = time.perf_counter()
            progress.start(f"{model_name} K={k}")
            row = measure(model_name, k, data, chosen[model_name], args, progress)
            rows.append(row)
            seconds = time.perf_counter() - cell_start
            progress.finish(
                f"{model_name} K={k} ({seconds:.1f} s): sequential "
                f"{row.sequential_ms:.3f} ms/step, lockstep {row.lockstep_ms:.3f} ms/step, "
                f"{row.speedup:.2f}x ({row.steps_per_block} steps x {row.rounds} rounds)")
            for side, count in row.non_finite.items():
                if count:
                    notes.append(f"{model_name} K={k}: {count} configurations of the {side} side "
                                 "ended with non-finite weights (trained alike on both sides)")
    if not args.no_rss:
        for row in rows:
            progress.start(f"rss {row.model} K={row.k}")
            row.rss_mib = {}
            for side in SIDES:
                progress.phase(f"{side} probe ({args.rss_steps} steps in a child process)")
                row.rss_mib[side] = measure_rss(row.model, row.k, side, chosen[row.model], args)
            progress.finish(f"rss {row.model} K={row.k}: sequential "
                            f"{fmt_rss(row, 'sequential')} MiB, lockstep "
                            f"{fmt_rss(row, 'lockstep')} MiB")
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

