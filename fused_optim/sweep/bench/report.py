"""The run's outputs: the console table, the Markdown report and the JSON."""

from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import shlex
import sys
import time

import torch

from fused_optim.bench import fmt_number, load_average, machine_info
from fused_optim.sweep.bench.sides import TORCH_IMPLS
from fused_optim.sweep.bench.timing import BLOCK_SECONDS, Calibration, Row
from fused_optim.sweep.results import text_table


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
    # (a package run with -m is its __main__ module: named by the package)
    module = spec.name.removesuffix(".__main__") if spec is not None else None
    head = ["python", "-m", module] if module else ["python", sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])


def run_metadata(args, commit, started, load_before, notes) -> dict:
    """`commit`: (commit, where it was found), taken when the run started."""
    return {
        "command": command_line(),
        "commit": commit[0],
        "commit_source": commit[1],
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
        f"- commit: `{meta['commit']}` ({meta['commit_source']})",
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
