"""The command line: ``python -m fused_optim.bench [options]``, or
``--sweep [options]`` for the lockstep sweep benchmark."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import textwrap
import time
from pathlib import Path

import torch

from fused_optim.bench.measure import Session, plan, run_all
from fused_optim.bench.metadata import BUSY_LOAD, commit_and_source, load_average, run_metadata
from fused_optim.bench.peers import load_ours, why_ours_cannot_run
from fused_optim.bench.progress import BlockProgress, log
from fused_optim.bench.report import (
    console_table, fmt_count, plot_stem, summary_markdown, write_outputs,
)
from fused_optim.bench.specs import (
    ALL_OPTIMIZERS,
    IMPL_DESCRIPTIONS,
    IMPLS,
    OPTIMIZERS,
    OURS,
    PRECISION_SETS,
    PRECISIONS,
)
from fused_optim.bench.timing import BandwidthProbe
from fused_optim.bench.workloads import WORKLOADS, describe_workload

DEFAULT_REPEATS = {"cpu": 45, "cuda": 51}
DEFAULT_WARMUP = 3
# A timed sample is a run of back-to-back steps at least this long (the
# first step of each sample pays what the other implementations left in
# the caches): steady-state steps, as a training loop runs them.
DEFAULT_SAMPLE_MS = 5.0

# --------------------------------------------------------------------------
# Values: each option's parser, so that argparse names the option in errors
# --------------------------------------------------------------------------


def number(text: str, convert, kind: str):
    try:
        return convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {kind}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = number(text, float, "a number")
    if not (math.isfinite(value) and value >= 0):  # (nan >= 0 is False too)
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = number(text, float, "a number")
    if not (math.isfinite(value) and value > 0):  # (nan > 0 is False too)
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text!r}")
    return value


def device_name(text: str) -> str:
    if text != "cpu" and not re.fullmatch(r"cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")
    return text


def check_output_files(parser: argparse.ArgumentParser, paths: dict) -> None:
    """Refuses, before anything is timed, output files that could not be
    written at the end (``paths``: option -> PATH or None): a folder, a
    place that cannot be written, one file for two options. Missing
    folders are made."""
    given = {option: Path(path) for option, path in paths.items() if path}
    seen: dict = {}
    for option, path in given.items():
        if path.resolve() in seen:
            parser.error(f"{option} and {seen[path.resolve()]} name the same file: {path}")
        seen[path.resolve()] = option
        if path.is_dir():
            parser.error(f"{option} {path}: a folder, not a file")
        why = unwritable(path.parent)
        if why:
            parser.error(f"{option} {path}: cannot write there ({why})")


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in ``folder``, which is made with its
    parents where missing; None where they can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".fused_optim_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        blocker = next((p for p in (folder, *folder.parents)
                        if p.exists() and not p.is_dir()), None)
        return f"{blocker} is a file" if blocker else str(error.strerror or error)
    return None


def name_list(choices, all_names=None):
    """Parser of a comma-separated list of `choices` (or 'all': `all_names`,
    by default every choice), duplicates dropped."""

    def parse(text: str) -> list[str]:
        if text == "all":
            return list(choices if all_names is None else all_names)
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {unknown or text!r}; choose from {', '.join(choices)} or 'all'"
            )
        return list(dict.fromkeys(names))

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


# --------------------------------------------------------------------------
# Help: the names and their meaning, generated from the tables
# --------------------------------------------------------------------------


def wrap(text: str, **kwargs) -> str:
    """Text for the help's free-form parts, which argparse prints as they are
    (names with hyphens kept whole: they are what one types)."""
    return textwrap.fill(text, width=79, break_on_hyphens=False, **kwargs)


def described_names(title: str, entries: list[tuple[str, str]]) -> list[str]:
    width = max(len(name) for name, _ in entries)
    lines = [f"{title}:"]
    for name, text in entries:
        lines.append(wrap(text, initial_indent=f"  {name:<{width}}  ",
                          subsequent_indent=" " * (width + 4)))
    return lines


def names_help() -> str:
    precision_sets = [(name, "the set " + ", ".join(members))
                      for name, members in PRECISION_SETS.items()]
    sections = [
        ("optimizers (--optimizers)",
         [(name, spec.describe() + ("" if spec.in_all else "; unfused, by name only: not in 'all'"))
          for name, spec in OPTIMIZERS.items()]),
        ("workloads (--workloads)", [(name, describe_workload(name)) for name in WORKLOADS]),
        ("precisions (--precisions; torch.optim's peers run the param dtype their own way)",
         [(name, p.describe()) for name, p in PRECISIONS.items()] + precision_sets),
        ("implementations (--impls)", list(IMPL_DESCRIPTIONS.items())),
    ]
    return "\n".join(line for title, entries in sections
                     for line in described_names(title, entries) + [""])


# The default CPU run on the 2-core AMD EPYC VM of benchmarks/results, ten
# optimizers (40 blocks), took 306 s on 2026-12-04 (bash scripts/bench.sh
# from a fresh clone: its blocks' times, printed per block, add up to 305 s).
# The split between set-up (allocation, optimizer state, warm-up) and the
# 45 rounds is estimated from the five-optimizer run of 2026-11-21 (16 s of
# its 103 s were set-up), scaled to 40 blocks.
DEFAULT_RUN_MINUTES_2CORE = "5 to 6"
DEFAULT_RUN_SETUP_S_2CORE = 30
DEFAULT_RUN_ROUND_S_2CORE = 6

def run_time_help() -> str:
    blocks = len(ALL_OPTIMIZERS) * len(WORKLOADS)
    return wrap(
        f"Run time: the default run ({len(ALL_OPTIMIZERS)} optimizers x {len(WORKLOADS)} workloads "
        f"x fp32 = {blocks} blocks, {DEFAULT_REPEATS['cpu']} interleaved rounds after "
        f"{DEFAULT_WARMUP} warm-up steps) takes about {DEFAULT_RUN_MINUTES_2CORE} minutes on a "
        f"2-core CPU: about {DEFAULT_RUN_SETUP_S_2CORE} s of set-up plus "
        f"{DEFAULT_RUN_ROUND_S_2CORE} s per round. It grows with the number of blocks "
        "(optimizers x workloads x precisions; the large workload takes most of it, a bf16 "
        "block about 3/4 as long as fp32), with --repeats and with --scale. While a block "
        "runs, a progress line on stderr shows its round."
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fused_optim.bench",
        description=wrap("Step throughput of fused_optim vs torch.optim. The method is the "
                         "docstring of fused_optim/bench/__init__.py; benchmarks/README.md "
                         "says how to run and read it."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=names_help() + "\n" + run_time_help() + "\n\n" + wrap(
            "--sweep as the first argument runs the lockstep sweep benchmark instead, with "
            "its own options (python -m fused_optim.bench --sweep --help)."),
    )
    parser.add_argument("--optimizers", type=name_list(OPTIMIZERS, ALL_OPTIMIZERS),
                        default=list(ALL_OPTIMIZERS),
                        help="comma-separated names (below), or 'all' (default: all)")
    parser.add_argument("--workloads", type=name_list(WORKLOADS), default=list(WORKLOADS),
                        help="comma-separated names (below), or 'all' (default: all)")
    parser.add_argument("--precisions", "--dtypes", dest="precisions",
                        type=precision_list, default=["fp32"],
                        help="param dtypes and mixed-precision options: comma-separated "
                             "names or sets (below), or 'all' (default: fp32). fused_optim "
                             "runs each as named; the torch.optim peers run the same param "
                             "dtype with their own defaults (state in the param dtype, no "
                             "master weights); amp: under GradScaler, ours built with "
                             "fused=True where the class takes it (unscaled in the step)")
    parser.add_argument("--impls", type=name_list(IMPLS), default=list(IMPLS),
                        help="implementations to time: comma-separated names (below), or 'all'; "
                             f"{OURS} is always timed (default: all that apply)")
    parser.add_argument("--device", type=device_name, default="cpu",
                        help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--scale", type=positive_float, default=1.0,
                        help="multiplies every workload's number of elements (default: 1)")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="interleaved rounds: timed steps per implementation (default: "
                             f"{DEFAULT_REPEATS['cpu']} CPU, {DEFAULT_REPEATS['cuda']} CUDA)")
    parser.add_argument("--warmup", type=non_negative_int, default=DEFAULT_WARMUP,
                        help=f"untimed steps first (default: {DEFAULT_WARMUP})")
    parser.add_argument("--sample-ms", type=non_negative_float, default=DEFAULT_SAMPLE_MS,
                        help="a timed sample is this many ms of back-to-back steps of one "
                             "implementation (the same number of steps for every implementation "
                             "of a block, set from fused_optim's warm step); 0: one step per "
                             f"sample, each after other implementations' steps (default: "
                             f"{DEFAULT_SAMPLE_MS:g})")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads (default: torch's default)")
    parser.add_argument("--json", metavar="PATH", help="write results and metadata as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write a Markdown report")
    parser.add_argument("--plot", metavar="PATH",
                        help="write the plot to PATH.png and PATH.svg (default: beside --json, "
                             "else beside --markdown, same name; needs matplotlib)")
    parser.add_argument("--ours", choices=("fused_optim", "torch-fused"), default="fused_optim",
                        help="development only: time torch fused as 'ours'")
    args = parser.parse_args(argv)
    if args.device != "cpu" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch has no CUDA device")
    stem = plot_stem(args)
    check_output_files(parser, {"--json": args.json, "--markdown": args.markdown,
                                "the plot (--plot)": stem and stem.with_suffix(".png")})
    if args.device == "cuda":
        args.device = f"cuda:{torch.cuda.current_device()}"  # set_device needs an index
    device_kind = "cpu" if args.device == "cpu" else "cuda"
    if args.repeats is None:
        args.repeats = DEFAULT_REPEATS[device_kind]
    if OURS not in args.impls:
        args.impls.insert(0, OURS)  # ratios are relative to it
    # Pairs ours cannot run (a cautious optimizer with a precision option,
    # an optimizer --ours torch-fused lacks) are left out before any timing.
    ours_module = load_ours(args.ours)
    args.unbuildable = {}
    for optimizer in args.optimizers:
        for precision in args.precisions:
            why = why_ours_cannot_run(OPTIMIZERS[optimizer], PRECISIONS[precision],
                                      ours_module, args.device)
            if why is not None:
                args.unbuildable[optimizer, precision] = why
    if len(args.unbuildable) == len(args.optimizers) * len(args.precisions):
        parser.error("nothing to time: " + "; ".join(
            f"{o} {p}: {why}" for (o, p), why in args.unbuildable.items()))
    return args


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def start_session(args: argparse.Namespace) -> tuple[Session, float | None]:
    """Threads, device, our module, the reference pass; and the load average."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device != "cpu":
        torch.cuda.set_device(args.device)
    ours_module = load_ours(args.ours)
    notes = [] if args.ours == OURS else ["'fused_optim' rows are torch fused (--ours torch-fused)"]
    for (optimizer, precision), why in args.unbuildable.items():
        notes.append(f"{optimizer} {precision}: not run, {OURS} cannot be built for it ({why})")
        log(f"skipped: {notes[-1]}")
    log(f"torch {torch.__version__}, device {args.device}, "
        f"{fmt_count(torch.get_num_threads(), 'thread')}; {fmt_count(len(plan(args)), 'block')} "
        f"of {fmt_count(args.repeats, 'interleaved round')}")
    load_before = load_average()
    if load_before is not None and load_before > BUSY_LOAD * (os.cpu_count() or 1):
        notes.append(f"machine busy at start (load average {load_before:.1f}): noisy results")
        log(f"warning: {notes[-1]}")
    probe = BandwidthProbe(args.device)
    return Session(args, ours_module, probe, BlockProgress(), notes), load_before


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--sweep"]:
        from fused_optim.sweep import bench as sweep_bench

        sweep_bench.main(argv[1:])
        return
    args = parse_args(argv)
    started = time.perf_counter()
    commit = commit_and_source()  # at the start: the checkout may move during a long run
    session, load_before = start_session(args)
    results = run_all(session)
    meta = run_metadata(argv, args, session.probe, results, session.notes,
                        time.perf_counter() - started, load_before, commit)
    print(console_table(results))
    print()
    print("\n".join(summary_markdown(results)))
    for note in session.notes:
        print(f"note: {note}")
    print(f"bandwidth reference: {session.probe.description}; total {meta['elapsed_s']:.0f} s")
    written = write_outputs(args, meta, results)
    if written:
        print("wrote " + ", ".join(str(path) for path in written))
