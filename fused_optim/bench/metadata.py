"""What a report records about its run: the command, the commit of the code
that ran, the machine, the load, the bandwidth reference."""

from __future__ import annotations

import datetime
import os
import platform
import runpy
import shlex
import statistics
import subprocess
from pathlib import Path

import torch

# Load average per CPU above which the run is flagged as noisy.
BUSY_LOAD = 0.5

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # fused_optim/
UNKNOWN_COMMIT = "unknown"


def git_output(args: list[str], cwd) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def checkout_commit() -> str | None:
    """Short commit (``-dirty`` if tracked files differ) of the git checkout
    this package runs from; None when it does not run from one.

    The package's own files must be tracked there: an installed copy whose
    site-packages lies inside some checkout (a virtualenv in the repository)
    is not that checkout's code.
    """
    try:
        git_output(["ls-files", "--error-unmatch", "__init__.py"], PACKAGE_DIR)
        head = git_output(["rev-parse", "--short", "HEAD"], PACKAGE_DIR)
        dirty = git_output(["status", "--porcelain", "--untracked-files=no"], PACKAGE_DIR)
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        return None
    return head + ("-dirty" if dirty else "")


def build_commit() -> str | None:
    """The commit setup.py recorded in ``_build_info.py`` when it built this
    package; None for a build without git, or older than that record.

    Read as a file rather than imported: importing ``fused_optim._build_info``
    imports fused_optim, whose extension may not load (``--ours torch-fused``).
    """
    try:
        build_info = runpy.run_path(str(PACKAGE_DIR / "_build_info.py"))
    except OSError:  # a source tree that setup.py has not built
        return None
    commit = build_info.get("GIT_COMMIT")
    if not commit:
        return None
    return commit + ("-dirty" if build_info.get("GIT_DIRTY") else "")


def commit_and_source() -> tuple[str, str]:
    """The commit of the code that runs, and where it was found."""
    commit = checkout_commit()
    if commit:
        return commit, "git checkout"
    commit = build_commit()
    if commit:
        return commit, "recorded at build time"
    return UNKNOWN_COMMIT, "no git checkout, no commit recorded at build time"


def git_commit() -> str:
    """The commit of the code that runs: the checkout's, else the build's,
    else "unknown"."""
    return commit_and_source()[0]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()}
    if device != "cpu":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> float | None:
    """1-minute load average (runnable processes), None where unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_metadata(argv, args, probe, results, notes, elapsed, load_before, commit) -> dict:
    """`commit`: (commit, source), taken when the run started."""
    references = [r.bandwidth_gb_per_s for r in results]
    return {
        "command": shlex.join(["python", "-m", "fused_optim.bench", *argv]),
        "commit": commit[0],
        "commit_source": commit[1],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(args.device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "ours": args.ours,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "scale": args.scale,
        "precisions": args.precisions,
        "bandwidth_reference": probe.description,
        "bandwidth_gb_per_s_median": statistics.median(references) if references else None,
        "elapsed_s": elapsed,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "notes": notes,
    }
