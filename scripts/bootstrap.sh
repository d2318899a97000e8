#!/usr/bin/env bash
# Sets up everything fused_optim needs on a fresh machine, idempotently:
# a virtualenv in .venv (Python 3.11), the pinned CPU torch, build and test
# tools, and an in-place build of the extension. Re-running it rebuilds only
# what changed (ninja).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${FUSED_OPTIM_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "bootstrap: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
# torch is pinned: this machine's torch==2.13.0 is the CPU wheel; an unpinned
# torch would pull several GB of CUDA packages.
# matplotlib, scikit-learn (its bundled digits) and optuna are for
# fused_optim.sweep (plots, the example, distributed search); none of them
# depends on torch. expecttest is imported by torch's own test utilities,
# whose optimizer database tests/test_torch_optim_db.py runs ours through.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  "torch==2.13.0" numpy pytest hypothesis expecttest ninja setuptools wheel \
  matplotlib scikit-learn optuna
# lion-pytorch, the reference Lion of tests/test_lion.py (skipped without
# it), depends on torch: installed alone, pinned, without dependencies, so
# that it cannot replace the pinned torch.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  --no-deps "lion-pytorch==0.2.5"
# timm, whose Lars, Lamb and Lion are references of tests/test_lars.py,
# test_lamb.py and test_lion.py (skipped without it): the tests load only
# those files of timm/optim and the helpers they import (torch only), so
# timm is installed pinned, without dependencies (its package imports
# torchvision).
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
  --no-deps "timm==1.0.31"
# --no-build-isolation: the extension must be compiled against the torch
# that will import it. -e: the compiled module lands in fused_optim/, so the
# tests and the benchmark run from this checkout. Skipped when the built
# module is newer than every source it is built from.
SO="$(ls fused_optim/_C*.so 2>/dev/null | head -n 1 || true)"
if [ -n "$SO" ] && [ -z "$(find csrc setup.py pyproject.toml -newer "$SO" -print -quit)" ] \
    && "$VENV/bin/python" -c "import fused_optim" 2>/dev/null; then
  echo "bootstrap: extension up to date ($SO)"
else
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-build-isolation -e .
fi
"$VENV/bin/python" -c "import fused_optim, torch; print(f'bootstrap: fused_optim ready (torch {torch.__version__}, CUDA kernels built: {fused_optim.cuda_built()})')"
