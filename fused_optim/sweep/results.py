"""What a sweep reports: per configuration its curves and why it stopped; a
leaderboard, a JSON file and a plot of all the loss curves."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fused_optim.sweep.space import Config, json_value

# Why a configuration stopped training.
COMPLETED, DIVERGED, HALVED, PRUNED = "completed", "diverged", "halved", "pruned"


@dataclass
class ConfigResult:
    """One configuration's run."""

    index: int  # its position in the configurations given
    config: Config
    train_steps: list = field(default_factory=list)  # steps at which train_loss was taken
    train_loss: list = field(default_factory=list)
    val_steps: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    val_metric: list = field(default_factory=list)
    steps_trained: int = 0
    stop_reason: str = COMPLETED
    stop_detail: str = ""
    state_dict: dict | None = None  # the weights where it stopped (None if diverged)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def kwargs(self) -> dict:
        """Ready keyword arguments: ``getattr(fused_optim, r.config.optimizer)(params, **r.kwargs)``."""
        return dict(self.config.kwargs)

    @property
    def final_train_loss(self) -> float:
        """Mean training loss over the last 10% of its steps (at least 1)."""
        if not self.train_loss:
            return math.nan
        tail = max(1, len(self.train_loss) // 10)
        return sum(self.train_loss[-tail:]) / tail

    @property
    def final_val_loss(self) -> float:
        return self.val_loss[-1] if self.val_loss else math.nan

    @property
    def final_metric(self) -> float:
        return self.val_metric[-1] if self.val_metric else math.nan

    def score(self) -> float:
        """What ranks it (lower is better): the last validation loss, or the
        final training loss without a validation split."""
        value = self.final_val_loss if self.val_loss else self.final_train_loss
        return value if math.isfinite(value) else math.inf

    def as_dict(self) -> dict:
        return {
            "index": self.index,
            "name": self.name,
            "config": {k: json_value(v) for k, v in self.config.as_dict().items()},
            "kwargs": {k: json_value(v) for k, v in self.kwargs.items()},
            "steps_trained": self.steps_trained,
            "stop_reason": self.stop_reason,
            "stop_detail": self.stop_detail,
            "final_train_loss": _finite_or_none(self.final_train_loss),
            "final_val_loss": _finite_or_none(self.final_val_loss),
            "final_metric": _finite_or_none(self.final_metric),
            "train_steps": self.train_steps,
            "train_loss": [_finite_or_none(v) for v in self.train_loss],
            "val_steps": self.val_steps,
            "val_loss": [_finite_or_none(v) for v in self.val_loss],
            "val_metric": [_finite_or_none(v) for v in self.val_metric],
        }


def _finite_or_none(value: float):
    return value if value is not None and math.isfinite(value) else None


_ORDER = {COMPLETED: 0, PRUNED: 1, HALVED: 1, DIVERGED: 2}


@dataclass
class SweepResult:
    results: list  # ConfigResult, in the order the configurations were given
    metric_name: str | None = None
    steps: int = 0
    seconds: float = 0.0

    def ranked(self) -> list:
        """Best first: configurations that trained to the end by score, then
        those stopped early (later stops first, then by score), diverged
        last."""
        return sorted(self.results, key=lambda r: (_ORDER[r.stop_reason], -r.steps_trained, r.score()))

    @property
    def best(self) -> ConfigResult | None:
        """The first of ``ranked()`` (None for a sweep of no configurations)."""
        ranked = self.ranked()
        return ranked[0] if ranked else None

    def leaderboard(self, top: int | None = None) -> str:
        """A text table: rank, configuration, final train/validation loss,
        metric, steps trained, why it stopped."""
        metric = self.metric_name or "metric"
        rows = [("rank", "configuration", "train loss", "val loss", metric, "steps", "stopped")]
        for rank, r in enumerate(self.ranked()[:top], 1):
            rows.append((
                str(rank), r.name, _fmt(r.final_train_loss), _fmt(r.final_val_loss),
                _fmt(r.final_metric), str(r.steps_trained),
                r.stop_reason + (f" ({r.stop_detail})" if r.stop_detail else ""),
            ))
        return text_table(rows)

    def markdown(self, top: int | None = None) -> str:
        """The leaderboard as a Markdown table."""
        metric = self.metric_name or "metric"
        lines = [f"| rank | configuration | train loss | val loss | {metric} | steps | stopped |",
                 "|---:|---|---:|---:|---:|---:|---|"]
        for rank, r in enumerate(self.ranked()[:top], 1):
            stop = r.stop_reason + (f" ({r.stop_detail})" if r.stop_detail else "")
            lines.append(f"| {rank} | {r.name} | {_fmt(r.final_train_loss)} | {_fmt(r.final_val_loss)} "
                         f"| {_fmt(r.final_metric)} | {r.steps_trained} | {stop} |")
        return "\n".join(lines)

    def over_seeds(self) -> str:
        """With configurations repeated over ``init_seed``: a text table of
        each configuration's mean final validation loss (training loss
        without validation) and metric over its initializations, with the
        spread (min-max) of the loss, best mean first. A ranking by one
        initialization can put close configurations in either order."""
        groups: dict = {}
        for r in self.results:
            key = {k: v for k, v in r.config.as_dict().items() if k not in ("init_seed", "name")}
            label = r.config.name.replace(f" init_seed={r.config.run.get('init_seed')}", "")
            groups.setdefault(repr(sorted(key.items(), key=lambda kv: kv[0])), (label, []))[1].append(r)
        rows = []
        for label, members in groups.values():
            losses = [m.final_val_loss if m.val_loss else m.final_train_loss for m in members]
            metrics = [m.final_metric for m in members]
            mean = sum(losses) / len(losses)
            rows.append((mean if math.isfinite(mean) else math.inf, label, losses, metrics))
        rows.sort(key=lambda row: row[0])
        metric = self.metric_name or "metric"
        table = [("rank", "configuration", "seeds", "mean loss", "min-max loss", f"mean {metric}")]
        for rank, (mean, label, losses, metrics) in enumerate(rows, 1):
            finite = [v for v in losses if math.isfinite(v)]
            spread = f"{_fmt(min(finite))}-{_fmt(max(finite))}" if finite else "-"
            table.append((str(rank), label, str(len(losses)), _fmt(mean), spread,
                          _fmt(sum(metrics) / len(metrics))))
        return text_table(table)

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "seconds": self.seconds,
            "metric": self.metric_name,
            "best": self.best.index if self.results else None,
            "ranking": [r.index for r in self.ranked()],
            "configurations": [r.as_dict() for r in self.results],
        }

    def to_json(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        return path

    def plot(self, stem, title: str = "") -> list[Path]:
        """Writes ``stem``.png and ``stem``.svg (needs matplotlib): the
        training loss (moving average) and validation loss of every
        configuration against steps, one color per optimizer family (darker
        for larger learning rates), the best in bold, stopped ones dotted;
        and, when configurations differ in learning rate, the final
        validation (or training) loss against the learning rate per family:
        the sensitivity curves that answer "which optimizer, which lr"."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        stem = Path(stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        with_val = any(r.val_loss for r in self.results)
        families = _families(self.results)
        with_lr = any(len({r.config.kwargs.get("lr") for r in members}) > 1
                      for members in families.values())
        panels = 1 + with_val + with_lr
        fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 5), squeeze=False)
        axes = list(axes[0])
        best = self.best
        palette = plt.get_cmap("tab10")
        style_of = {}
        for f, (family, members) in enumerate(families.items()):
            members = sorted(members, key=lambda r: _lr(r))
            for j, r in enumerate(members):
                shade = 0.45 + 0.55 * (j + 1) / len(members)
                style_of[id(r)] = {
                    "color": tuple(c * shade + (1 - shade) for c in palette(f % 10)[:3]),
                    "linewidth": 2.8 if r is best else 1.0,
                    "linestyle": "-" if r.stop_reason == COMPLETED else ":",
                }
        for r in self.results:
            style = style_of[id(r)]
            label = r.name + ("" if r.stop_reason == COMPLETED else f" [{r.stop_reason}]")
            axes[0].plot(r.train_steps, _smooth(r.train_loss), label=label, **style)
            if with_val and r.val_loss:
                axes[1].plot(r.val_steps, r.val_loss, marker=".", **style)
        axes[0].set(xlabel="step", ylabel="training loss (moving average of 10)", yscale="log",
                    title="training loss")
        if with_val:
            axes[1].set(xlabel="step", ylabel="validation loss", yscale="log", title="validation loss")
        if with_lr:
            ax = axes[-1]
            for f, (family, members) in enumerate(families.items()):
                members = sorted(members, key=lambda r: _lr(r))
                finals = [r.final_val_loss if with_val else r.final_train_loss for r in members]
                ax.plot([_lr(r) for r in members], [v if math.isfinite(v) else math.nan for v in finals],
                        marker="o", color=palette(f % 10), label=family)
                for r, v in zip(members, finals):
                    if r.stop_reason == DIVERGED:
                        ax.scatter([_lr(r)], [ax.get_ylim()[1]], marker="x", color=palette(f % 10))
            ax.scatter([_lr(best)], [best.final_val_loss if with_val else best.final_train_loss],
                       s=160, facecolors="none", edgecolors="black", label="best")
            ax.set(xscale="log", yscale="log", xlabel="learning rate",
                   ylabel=("final validation loss" if with_val else "final training loss"),
                   title="loss against learning rate (x: diverged)")
            ax.legend(fontsize=8)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=max(1, min(5, len(labels) // 8 + 1)), fontsize=7)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        paths = [stem.with_name(stem.name + ext) for ext in (".png", ".svg")]  # (a dotted stem kept whole)
        for path in paths:
            fig.savefig(path, bbox_inches="tight", dpi=110)
        plt.close(fig)
        return paths


def _families(results: list) -> dict:
    """Configurations grouped by everything but the learning rate (and the
    init seed), in the order first seen."""
    families: dict = {}
    for r in results:
        rest = {k: v for k, v in r.config.kwargs.items() if k != "lr"}
        key = r.config.name.split(" ")[0] + "".join(
            f" {k}={v}" for k, v in rest.items() if not (r.config.optimizer == "SGD" and k in ("momentum", "nesterov")))
        families.setdefault(key, []).append(r)
    return families


def _lr(r: ConfigResult) -> float:
    lr = r.config.kwargs.get("lr", math.nan)
    return float(lr)


def text_table(rows: list, right: bool = False) -> str:
    """Rows of strings (the first the header) as aligned columns with a rule
    under the header; ``right`` aligns every column but the first right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row) -> str:
        return "  ".join(cell.rjust(w) if right and i else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(row, widths))).rstrip()

    lines = [line(row) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _smooth(values: list, window: int = 10) -> list:
    out, total = [], 0.0
    finite = [v if math.isfinite(v) else math.nan for v in values]
    for i, v in enumerate(finite):
        total += v
        if i >= window:
            total -= finite[i - window]
        out.append(total / min(i + 1, window))
    return out


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3e}"
