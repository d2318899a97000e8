"""bf16 training with fused_optim.AdamW: round-to-nearest stalls, stochastic
rounding and fp32 master weights train like fp32.

What it shows. A bf16 number has 8 significant bits, so writing an updated
parameter back to bf16 with round-to-nearest drops every update smaller than
half an ulp of the parameter (2^-9 relative: 0.00195 for a weight in
[0.5, 1)). AdamW moves each weight by about `lr` per step, so with lr = 1.5e-3
every bf16 weight stops at magnitude 0.5 while the targets are in [1, 1.5):
plain bf16 training stalls far above the loss floor. Two remedies, both
options of fused_optim's optimizers:

- `stochastic_rounding=True`: the parameter is rounded up or down at random
  with the probabilities that make the rounding unbiased, so small updates
  accumulate in expectation; the parameter stays bf16 (no extra memory).
- `master_weights=True`: an fp32 copy of each parameter is updated and the
  bf16 parameter is written rounded from it (4 more bytes per element).

The problem is multi-output linear regression on synthetic data, full batch,
seeded (`make_problem`): 1024 samples, 64 features, 4 outputs, target weights
of magnitude in [1, 1.5) with random signs, Gaussian label noise of standard
deviation 0.5 (so the best possible loss is about 0.23). The four runs share
the data, the initial weights and the hyperparameters (`HYPERPARAMS`) and
differ only in the parameter dtype and the optimizer options (`CONFIGS`).
The moments are in the default `state_dtype`: bf16 in the plain bf16 and
stochastic-rounding runs (the param dtype), fp32 with master weights.

What is measured. The loss (mean squared error) is always computed in fp32
on the model's weights upcast, the bf16 parameters themselves in the bf16
runs (never the master copy), so the four curves are comparable. The
gradient is computed in fp32 from the same upcast weights and handed to the
optimizer in the parameter's dtype, as a bf16 model's backward would: the
runs differ only in how the optimizer stores and writes what it computes.

Run it from the repository root (a few seconds; it trains on one thread):

    python benchmarks/bf16_training.py
    python benchmarks/bf16_training.py --steps 500 --out-dir /tmp/bf16 --date test

It writes `<out-dir>/bf16-training-cpu-<date>.json` (configurations, loss
curves, command, commit, torch version, machine) and
`<out-dir>/bf16-training-cpu-<date>.svg` (the four loss curves, log scale).
`tests/test_bf16_training.py` checks the same behaviour on this problem.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import sys
import time

import torch

import fused_optim
from fused_optim.bench import git_commit, machine_info

# Why these: lr = 1.5e-3 lies between half a bf16 ulp just below 0.5
# (2^-10 = 0.00098: the update rounds to a whole ulp and the weight moves)
# and just above it (2^-9 = 0.00195: the update rounds away), so every bf16
# weight stops at |w| = 0.5, as long as Adam's normalized step stays
# between 0.65 and 1.3 times lr. beta2 = 0.99 (torch's default is 0.999) lets the second
# moment follow the shrinking gradients, so fp32 reaches the noise floor by
# step ~1300 and the plot shows converged runs, not a slow tail.
# weight_decay is AdamW's default.
HYPERPARAMS = {"lr": 1.5e-3, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 1e-2}

# name -> (parameter dtype, extra optimizer options)
CONFIGS = {
    "fp32": (torch.float32, {}),
    "bf16": (torch.bfloat16, {}),
    "bf16 + stochastic_rounding": (torch.bfloat16, {"stochastic_rounding": True}),
    "bf16 + master_weights": (torch.bfloat16, {"master_weights": True}),
}

DEFAULT_STEPS = 2000
RECORD_EVERY = 10


@dataclasses.dataclass(frozen=True)
class Problem:
    """Full-batch linear regression y = x @ weight.T + bias + noise (all fp32)."""

    x: torch.Tensor  # [samples, features]
    y: torch.Tensor  # [samples, outputs]
    weight0: torch.Tensor  # [outputs, features], initial weights
    bias0: torch.Tensor  # [outputs]


def make_problem(samples: int = 1024, features: int = 64, outputs: int = 4,
                 noise: float = 0.5, seed: int = 0) -> Problem:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    # Target magnitudes in [1, 1.5): plain bf16 stops at 0.5 (see HYPERPARAMS).
    magnitude = torch.empty(outputs, features).uniform_(1.0, 1.5, generator=g)
    sign = torch.randint(0, 2, (outputs, features), generator=g) * 2 - 1
    weight = magnitude * sign
    bias = torch.empty(outputs).uniform_(-0.4, 0.4, generator=g)
    y = x @ weight.T + bias + noise * torch.randn(samples, outputs, generator=g)
    weight0 = 0.01 * torch.randn(outputs, features, generator=g)
    return Problem(x=x, y=y, weight0=weight0, bias0=torch.zeros(outputs))


def loss_and_gradients(problem: Problem, weight: torch.Tensor, bias: torch.Tensor):
    """Mean squared error and its gradients, in fp32 on the upcast weights."""
    residual = problem.x @ weight.float().T + bias.float() - problem.y
    scale = 2.0 / residual.numel()
    loss = residual.square().mean()
    return loss.item(), scale * residual.T @ problem.x, scale * residual.sum(0)


@dataclasses.dataclass
class Run:
    config: str
    steps: list[int]  # the steps at which `losses` were recorded
    losses: list[float]  # loss after that many optimizer steps
    weight: torch.Tensor  # final parameters, in the config's dtype
    bias: torch.Tensor
    state_dtype: torch.dtype | None  # of the moments, as the optimizer made them
    seconds: float


def train(config: str, steps: int, problem: Problem | None = None,
          record_every: int = RECORD_EVERY) -> Run:
    """Trains the regression with fused_optim.AdamW in configuration `config`.

    On one thread (restored after): the matmuls are 1024 x 64 x 4, too small
    for a second thread to help, and on a busy 2-core machine OpenMP's
    barriers made 2 threads 10 to 100 times slower. One thread also makes
    the fp32 reductions, hence the losses, independent of the core count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, steps, problem, record_every)
    finally:
        torch.set_num_threads(threads)


def _train(config: str, steps: int, problem: Problem | None, record_every: int) -> Run:
    problem = problem if problem is not None else make_problem()
    dtype, options = CONFIGS[config]
    weight = problem.weight0.to(dtype, copy=True).requires_grad_()
    bias = problem.bias0.to(dtype, copy=True).requires_grad_()
    optimizer = fused_optim.AdamW([weight, bias], **HYPERPARAMS, **options)
    recorded_steps, losses = [], []
    start = time.perf_counter()
    for step in range(steps + 1):
        loss, grad_weight, grad_bias = loss_and_gradients(problem, weight.detach(), bias.detach())
        if not math.isfinite(loss):
            raise FloatingPointError(f"{config}: loss {loss} at step {step}")
        if step % record_every == 0 or step == steps:
            recorded_steps.append(step)
            losses.append(loss)
        if step == steps:
            break
        weight.grad = grad_weight.to(dtype)
        bias.grad = grad_bias.to(dtype)
        optimizer.step()
    seconds = time.perf_counter() - start
    state_dtype = optimizer.state[weight]["exp_avg"].dtype if steps else None
    return Run(config, recorded_steps, losses, weight.detach(), bias.detach(),
               state_dtype, seconds)


# --------------------------------------------------------------------------
# SVG plot
# --------------------------------------------------------------------------

# (color, dash pattern, stroke width): the three curves that train alike lie
# on top of each other, so they differ in dash and width, not only in color.
STYLES = [
    ("#1f77b4", "", 3.5),
    ("#d62728", "", 2.0),
    ("#2ca02c", "8 5", 2.0),
    ("#ff7f0e", "2 4", 2.5),
]


def nice_step(span: float, target_ticks: int = 6) -> float:
    """A 1, 2 or 5 times a power of ten giving about `target_ticks` ticks."""
    raw = span / target_ticks
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def svg_plot(series: dict[str, tuple[list[float], list[float]]], title: str,
             xlabel: str, ylabel: str, width: int = 760, height: int = 460) -> str:
    """Line plot, linear x and log10 y, as an SVG document (same input, same bytes)."""
    left, right, top, bottom = 80, 20, 40, 60
    xs = [x for xv, _ in series.values() for x in xv]
    ys = [y for _, yv in series.values() for y in yv]
    x_min, x_max = min(xs), max(xs)
    y_lo = math.floor(math.log10(min(ys)))
    y_hi = math.ceil(math.log10(max(ys)))
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x_min) / (x_max - x_min) * plot_w

    def py(y: float) -> float:
        return top + (y_hi - math.log10(y)) / (y_hi - y_lo) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left + plot_w / 2:.1f}" y="24" text-anchor="middle" '
        f'font-size="15">{title}</text>',
    ]
    for decade in range(y_lo, y_hi + 1):  # horizontal grid and y labels
        y = py(10.0 ** decade)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                   'stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" '
                   f'text-anchor="end">{10.0 ** decade:g}</text>')
    step = nice_step(x_max - x_min)
    tick = math.ceil(x_min / step) * step
    while tick <= x_max:  # vertical grid and x labels
        x = px(tick)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" '
                   'stroke="#eee"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 18}" '
                   f'text-anchor="middle">{tick:g}</text>')
        tick += step
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
               'fill="none" stroke="black"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 15}" '
               f'text-anchor="middle">{xlabel}</text>')
    out.append(f'<text transform="translate(20 {top + plot_h / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{ylabel}</text>')
    for (name, (xv, yv)), (color, dash, stroke) in zip(series.items(), STYLES):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xv, yv))
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="{stroke}"'
                   f'{dash_attr} points="{points}"/>')
    # Legend bottom left: the loss curves start at the top left and end
    # either high (stalled) or low on the right.
    legend_h = 20 * len(series) + 8
    legend_x, legend_y = left + 12, top + plot_h - legend_h - 12
    out.append(f'<rect x="{legend_x}" y="{legend_y}" width="240" '
               f'height="{legend_h}" fill="white" stroke="#999"/>')
    for i, (name, (color, dash, stroke)) in enumerate(zip(series, STYLES)):
        y = legend_y + 18 + 20 * i
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{legend_x + 8}" y1="{y - 4}" x2="{legend_x + 48}" '
                   f'y2="{y - 4}" stroke="{color}" stroke-width="{stroke}"{dash_attr}/>')
        out.append(f'<text x="{legend_x + 56}" y="{y}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run time with the defaults: a few seconds (one thread).")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"training steps per configuration (default: {DEFAULT_STEPS})")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="where the results go (default: benchmarks/results of this "
                             "checkout, where the project keeps its results)")
    parser.add_argument("--date", default=datetime.date.today().isoformat(),
                        help="goes into the file names (default: today)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    problem = make_problem()
    runs = []
    for config in CONFIGS:
        run = train(config, args.steps, problem)
        runs.append(run)
        print(f"{config:28s} final loss {run.losses[-1]:.6g}  ({run.seconds:.1f} s)")

    stem = os.path.join(args.out_dir, f"bf16-training-cpu-{args.date}")
    os.makedirs(args.out_dir, exist_ok=True)
    report = {
        "command": shlex.join(["python", "benchmarks/bf16_training.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "date": args.date,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "machine": machine_info("cpu"),
        "threads": 1,  # see train()
        "optimizer": "fused_optim.AdamW",
        "hyperparameters": HYPERPARAMS,
        "problem": "make_problem() defaults: linear regression, 1024 samples, 64 features, "
                   "4 outputs, |target weights| in [1, 1.5), label noise std 0.5, seed 0",
        "loss": "mean squared error in fp32 on the parameters upcast, after `steps` steps",
        "steps": runs[0].steps,
        "configs": {
            run.config: {
                "param_dtype": str(CONFIGS[run.config][0]),
                "options": CONFIGS[run.config][1],
                "state_dtype": str(run.state_dtype),
                "final_loss": run.losses[-1],
                "seconds": round(run.seconds, 3),
                "losses": run.losses,
            }
            for run in runs
        },
    }
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    svg = svg_plot({run.config: (run.steps, run.losses) for run in runs},
                   title=f"AdamW (fused_optim), lr {HYPERPARAMS['lr']:g}: "
                         "bf16 round-to-nearest stalls",
                   xlabel="step", ylabel="training loss (MSE, fp32 evaluation, log scale)")
    with open(stem + ".svg", "w") as f:
        f.write(svg)
    print(f"wrote {stem}.json and {stem}.svg")


if __name__ == "__main__":
    main()
