"""The plot of a run, PNG and SVG: for each workload and precision, per
optimizer, the step time of fused_optim and of each peer (labelled with
peer / ours), and the fraction of the measured bandwidth each reached."""

from __future__ import annotations

from pathlib import Path

from fused_optim.bench.specs import IMPLS, OPTIMIZERS, OURS

# Inches per (workload, precision) row of panels; the figure is two panels wide.
ROW_HEIGHT = 3.8
FIGURE_WIDTH = 14


def write_plot(results: list, title: str, stem: Path) -> list[Path]:
    """Writes ``stem``.png and ``stem``.svg; returns their paths ([] without results).

    Raises ImportError without matplotlib: the caller notes it and goes on.
    """
    if not results:
        return []
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and none needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    impls = [impl for impl in IMPLS if any(r.impl == impl for r in results)]
    colors = {impl: plt.get_cmap("tab10")(IMPLS.index(impl)) for impl in impls}
    rows = list(dict.fromkeys((r.workload, r.precision) for r in results))
    fig, axes = plt.subplots(len(rows), 2, figsize=(FIGURE_WIDTH, ROW_HEIGHT * len(rows) + 1),
                             squeeze=False)
    for (workload, precision), (time_ax, bandwidth_ax) in zip(rows, axes):
        cell = {(r.optimizer, r.impl): r for r in results
                if (r.workload, r.precision) == (workload, precision)}
        draw_step_times(time_ax, cell, impls, colors)
        time_ax.set_title(f"{workload}, {precision}: median step time\n"
                          "(lower is faster; bar labels: peer time / fused_optim time)")
        draw_bandwidth_fractions(bandwidth_ax, cell, impls, colors)
        bandwidth_ax.set_title(f"{workload}, {precision}: fraction of the measured bandwidth\n"
                               "(higher is better; reference pass timed in the same rounds)")
    # Title and legend in the top inch, above every row (positions in inches
    # from the top: the figure's height varies with the number of rows).
    height = fig.get_figheight()
    fig.suptitle(title, y=1 - 0.1 / height, va="top")
    fig.legend(handles=[Patch(color=colors[impl], label=impl) for impl in impls],
               loc="upper center", ncol=len(impls), bbox_to_anchor=(0.5, 1 - 0.4 / height),
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + ext) for ext in (".png", ".svg")]  # (a dotted stem kept whole)
    for path in paths:
        fig.savefig(path, bbox_inches="tight", dpi=110)
    plt.close(fig)
    return paths


def grouped_bars(ax, cell: dict, impls: list[str], colors: dict, value) -> dict:
    """One group of bars per optimizer, one bar per implementation that ran
    in it; returns impl -> (bars, their results) for labelling."""
    optimizers = list(dict.fromkeys(optimizer for optimizer, _ in cell))
    width = 0.8 / len(impls)
    drawn = {}
    for j, impl in enumerate(impls):
        offset = (j - (len(impls) - 1) / 2) * width
        ran = [(i, cell[(o, impl)]) for i, o in enumerate(optimizers) if (o, impl) in cell]
        if not ran:
            continue
        bars = ax.bar([i + offset for i, _ in ran], [value(r) for _, r in ran], width,
                      color=colors[impl])
        drawn[impl] = (bars, [r for _, r in ran])
    ax.set_xticks(range(len(optimizers)),
                  [OPTIMIZERS[o].label or OPTIMIZERS[o].class_name for o in optimizers])
    ax.set_xlabel("optimizer")
    ax.grid(axis="y", alpha=0.3)
    return drawn


def draw_step_times(ax, cell: dict, impls: list[str], colors: dict) -> None:
    # A linear scale, so that bar lengths compare as the times do; the labels
    # give the ratios of bars too short to judge by eye.
    drawn = grouped_bars(ax, cell, impls, colors, lambda r: r.median_s * 1e3)
    for impl, (bars, ran) in drawn.items():
        if impl != OURS:
            labels = ["" if r.peer_over_ours is None else f"{r.peer_over_ours:.2f}x" for r in ran]
            ax.bar_label(bars, labels=labels, fontsize=7, rotation=90, padding=2)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the labels above the tallest bar
    ax.set_ylabel("median step time (ms)")


def draw_bandwidth_fractions(ax, cell: dict, impls: list[str], colors: dict) -> None:
    # Per round: each step against the reference pass of its own round (the
    # figure to read when the machine's bandwidth changes level in a block).
    drawn = grouped_bars(ax, cell, impls, colors,
                         lambda r: 100 * r.bandwidth_fraction_per_round)
    highest = 0.0
    for bars, ran in drawn.values():
        ax.bar_label(bars, labels=[f"{100 * r.bandwidth_fraction_per_round:.0f}%"
                                   for r in ran], fontsize=7, rotation=90, padding=2)
        highest = max([highest] + [100 * r.bandwidth_fraction_per_round for r in ran])
    ax.axhline(100, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, max(115, highest * 1.2))
    ax.set_ylabel("% of the reference bandwidth\n(median over rounds)")
