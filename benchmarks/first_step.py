"""What the first step costs: the constructor and the first ``step()``
together (the state is made there), ours against torch.optim's fused and
foreach steps, on `tiny` (4 tensors of 1,024 elements) and `many-small`
(2,000 tensors of 1,000). What training loops pay once, and what a search
that builds many optimizers (or an RL loop that rebuilds one) pays often.

Each sample builds new params, then times ``Optimizer(params)`` and one
step. Every implementation runs in a process of its own, one after another
in each round, the order rotated by one each round (docs/benchmarking.md:
interleaved, so the machine's drift falls on all alike): a process because
the first step allocates from the heap as a fresh program's does, and
because fused_optim from two checkouts (``--checkouts``: before and after a
change, each built in place) cannot share one. The table gives the medians
over all rounds' samples.

    python benchmarks/first_step.py [--optimizers sgd,adam,adagrad]
        [--workloads tiny,many-small] [--rounds 10] [--checkouts PATH[,PATH...]]

About 8 minutes on 2 cores with the defaults (3 optimizers, 4
implementations, 10 rounds: mostly the 120 processes' start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from interleaved import OPTIMIZERS

# workload -> (tensors, elements per tensor, samples per process)
WORKLOADS = {"tiny": (4, 1024, 40), "many-small": (2000, 1000, 5)}
TORCH_IMPLS = {"torch-fused": {"fused": True}, "torch-foreach": {"foreach": True}}


def _worker(impl: str, optimizer: str, workloads: str) -> None:
    """Prints {workload: [seconds of each sample]} for one implementation."""
    class_name, kwargs = OPTIMIZERS[optimizer]
    if impl in TORCH_IMPLS:
        cls, kwargs = getattr(torch.optim, class_name), {**kwargs, **TORCH_IMPLS[impl]}
    else:
        import fused_optim  # (from the checkout on PYTHONPATH)

        cls = getattr(fused_optim, class_name)
    times = {}
    for workload in workloads.split(","):
        count, numel, samples = WORKLOADS[workload]
        times[workload] = []
        for sample in range(samples + 1):  # (the first: the process's warm-up)
            gen = torch.Generator().manual_seed(sample)
            params = [torch.randn(numel, generator=gen).requires_grad_() for _ in range(count)]
            for p in params:
                p.grad = torch.randn(numel, generator=gen)
            start = time.perf_counter()
            cls(params, **kwargs).step()
            if sample:
                times[workload].append(time.perf_counter() - start)
    print(json.dumps(times))


def _run_worker(impl: str, checkout: str | None, optimizer: str, workloads: str) -> dict:
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = checkout
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", impl, optimizer,
                          workloads],
                         env=env, capture_output=True, text=True, check=True,
                         cwd=checkout or os.getcwd())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run time with the defaults: about 6 to 8 minutes on a 2-core CPU machine "
               "(mostly the 120 processes' start-up).")
    parser.add_argument("--optimizers", default="sgd,adam,adagrad",
                        help=f"comma-separated, of {', '.join(OPTIMIZERS)}")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (at least 1)")
    parser.add_argument("--checkouts", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="fused_optim checkouts, each built in place (default: this one)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return
    optimizers, workloads = args.optimizers.split(","), args.workloads.split(",")
    for option, names, known in (("--optimizers", optimizers, OPTIMIZERS),
                                 ("--workloads", workloads, WORKLOADS)):
        if not set(names) <= set(known):
            parser.error(f"{option}: unknown {sorted(set(names) - set(known))}; "
                         f"known: {', '.join(known)}")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    checkouts = [os.path.abspath(path) for path in args.checkouts.split(",")]
    for path in checkouts:
        if not os.path.isfile(os.path.join(path, "fused_optim", "__init__.py")):
            parser.error(f"--checkouts: {path} is not a fused_optim checkout")
    impls = [(f"fused_optim@{i}" if len(checkouts) > 1 else "fused_optim", path)
             for i, path in enumerate(checkouts)] + [(name, None) for name in TORCH_IMPLS]
    samples: dict = {}
    for round_ in range(args.rounds):
        shift = round_ % len(impls)
        for optimizer in optimizers:
            for name, checkout in impls[shift:] + impls[:shift]:
                worker = name if checkout is None else "fused_optim"
                for workload, times in _run_worker(worker, checkout, optimizer,
                                                   args.workloads).items():
                    samples.setdefault((optimizer, workload, name), []).extend(times)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    for (name, _), path in zip(impls, checkouts):
        print(f"{name}: {path}")
    names = [name for name, _ in impls]
    ours = names[:len(checkouts)]
    ratios = [(n, "torch-fused") for n in ours] + ([(ours[-1], ours[0])] if len(ours) > 1 else [])
    print("| optimizer | workload | " + " | ".join(f"{n} (us)" for n in names) + " | "
          + " | ".join(f"{a} / {b}" for a, b in ratios) + " |")
    print("|---|---|" + "---:|" * (len(names) + len(ratios)))
    for optimizer in optimizers:
        for workload in workloads:
            med = {n: statistics.median(samples[(optimizer, workload, n)]) for n in names}
            print(f"| {optimizer} | {workload} | " + " | ".join(f"{med[n] * 1e6:.0f}" for n in names)
                  + " | " + " | ".join(f"{med[a] / med[b]:.2f}" for a, b in ratios) + " |")

if __name__ == "__main__":
    main()
