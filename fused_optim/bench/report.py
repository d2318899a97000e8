"""The outputs of a run: the console table, the Markdown report, the JSON,
and the plot beside them."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from fused_optim.bench.plot import write_plot
from fused_optim.bench.progress import log
from fused_optim.bench.specs import OPTIMIZERS, OURS, PEERS, PRECISIONS, bytes_per_element


def fmt_number(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_count(count: int, noun: str) -> str:
    """fmt_count(1, "thread") == "1 thread", fmt_count(2, "thread") == "2 threads"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def console_table(results: list) -> str:
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


def results_by_block(results: list) -> dict[tuple, dict]:
    """(optimizer, workload, precision) -> impl -> Result."""
    grouped: dict[tuple, dict] = {}
    for r in results:
        grouped.setdefault((r.optimizer, r.workload, r.precision), {})[r.impl] = r
    return grouped


def peer_config(optimizer: str, precision_name: str) -> str:
    """What the torch.optim peers of a block run, with their byte budget."""
    peer = PRECISIONS[precision_name].torch_equivalent()
    return f"{peer.describe()} ({bytes_per_element(OPTIMIZERS[optimizer], peer)})"


def summary_markdown(results: list) -> list[str]:
    peers = [p for p in PEERS if any(r.impl == p for r in results)]
    header = ["optimizer", "workload", "precision", "params", "tensors", "groups", "B/elem",
              "steps/sample", "ours ms", "GB/s", "ref GB/s", "% BW", "% BW per round",
              "torch peers ran (B/elem)", *(f"vs {p}" for p in peers)]
    lines = [table_row(header), "|" + "---|" * len(header)]
    for (optimizer, workload, precision), by_impl in results_by_block(results).items():
        ours = by_impl.get(OURS)
        if ours is None:
            continue
        ratios = [fmt_ratio(by_impl[p].peer_over_ours) if p in by_impl else "-" for p in peers]
        lines.append(table_row([
            optimizer, workload, precision, fmt_params(ours.numel), ours.tensors, ours.groups,
            f"{ours.bytes_per_step / ours.numel:g}", ours.steps_per_sample,
            f"{ours.median_s * 1e3:.3f}", f"{ours.gb_per_s:.1f}", f"{ours.bandwidth_gb_per_s:.1f}",
            f"{ours.bandwidth_fraction:.0%}", f"{ours.bandwidth_fraction_per_round:.0%}",
            peer_config(optimizer, precision), *ratios,
        ]))
    return lines


def table_row(cells) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def fmt_params(numel: int) -> str:
    """An element count: millions with one decimal from 100,000 up, else
    the count itself (a tiny workload is not "0.0M")."""
    return f"{numel / 1e6:.1f}M" if numel >= 100_000 else f"{numel:,}"


def detail_markdown(results: list) -> list[str]:
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
            kwargs += ("; GradScaler: fused=True where the class takes it, and master "
                       "weights, unscale in the step; else GradScaler's own pass")
        ours_bytes = "/".join(
            str(bytes_per_element(OPTIMIZERS[o], precision)) for o in ("sgd", "adam")
        )
        peer_bytes = "/".join(str(bytes_per_element(OPTIMIZERS[o], peer)) for o in ("sgd", "adam"))
        lines.append(
            f"| {name} | {precision.describe()} | {kwargs} | {peer.describe()} "
            f"| {ours_bytes} | {peer_bytes} |"
        )
    return lines


def run_location(meta: dict) -> str:
    """The device, or the CPU model and count: the title of the reports."""
    machine = meta["machine"]
    return machine.get("device") or f"{machine['cpu']} ({machine['cpu_count']} CPUs)"


def markdown_report(meta: dict, results: list, plot_link: str | None = None) -> str:
    machine = meta["machine"]
    lines = [
        f"# fused_optim benchmark: {run_location(meta)}",
        "",
        f"- command: `{meta['command']}`",
        f"- commit: `{meta['commit']}` ({meta['commit_source']})",
        f"- date: {meta['date']}",
        f"- machine: {machine['platform']}; CPU {machine['cpu']}"
        + (f"; {machine['device']} (CUDA {machine['cuda']})" if "device" in machine else ""),
        f"- torch {meta['torch']}, {fmt_count(meta['threads'], 'thread')}, device `{meta['device']}`",
        f"- bandwidth reference: {meta['bandwidth_reference']}, timed in every round "
        f"(ref GB/s; median over the run {fmt_number(meta['bandwidth_gb_per_s_median'])} GB/s)",
        f"- {fmt_count(meta['repeats'], 'interleaved repeat')} after "
        f"{fmt_count(meta['warmup'], 'warm-up step')}, "
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
        *(["", f"![step times and bandwidth fractions]({plot_link})"] if plot_link else []),
        "",
        "## All measurements",
        "",
        *detail_markdown(results),
    ]
    if meta["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in meta["notes"]]
    return "\n".join(lines) + "\n"


def plot_stem(args) -> Path | None:
    """Where the plot goes: --plot, else beside --json, else beside --markdown
    (the same name with .png and .svg)."""
    for path in (args.plot, args.json, args.markdown):
        if path:
            path = Path(path)
            return path.with_suffix("") if path.suffix in (".json", ".md", ".png", ".svg") else path
    return None


def try_plot(meta: dict, results: list, stem: Path) -> list[Path]:
    """The plot's paths; none, with a note, where matplotlib is missing."""
    try:
        return write_plot(results, plot_title(meta), stem)
    except ImportError:
        log("note: matplotlib is not installed: no plot (pip install matplotlib)")
        return []


def plot_title(meta: dict) -> str:
    return (f"fused_optim vs torch.optim, {meta['device']}: {run_location(meta)}, "
            f"{fmt_count(meta['threads'], 'thread')}; commit {meta['commit']}; "
            f"{fmt_count(meta['repeats'], 'interleaved round')}, medians")


def write_outputs(args, meta: dict, results: list) -> list[Path]:
    """Writes what the options ask for; returns the paths written."""
    written = []
    for path in (args.json, args.markdown):
        if path:  # (a missing folder must not lose a long run at its end)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if args.json:  # first: the raw times are the one output that cannot be redrawn
        payload = {**meta, "results": [dataclasses.asdict(r) for r in results]}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        written.append(Path(args.json))
    stem = plot_stem(args)
    if stem is not None:  # before the Markdown, which links the plot
        written += try_plot(meta, results, stem)
    if args.markdown:
        png = next((p for p in written if p.suffix == ".png"), None)
        link = os.path.relpath(png, Path(args.markdown).parent) if png else None
        with open(args.markdown, "w") as f:
            f.write(markdown_report(meta, results, link))
        written.append(Path(args.markdown))
    return written
