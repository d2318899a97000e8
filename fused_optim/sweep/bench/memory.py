"""Memory: the peak resident memory of each (model, K, side), each in a
fresh process (``--rss-probe``: this package run as a child)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch

import fused_optim
from fused_optim.bench import free_memory
from fused_optim.sweep.bench.configs import sweep_configs
from fused_optim.sweep.bench.sides import Batches, block_of, build_side
from fused_optim.sweep.space import make_configs

RSS_STEPS = 20


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
    # (the folder holding this fused_optim, first on the child's path)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(fused_optim.__file__)))
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
