#!/usr/bin/env bash
# Set-up + the throughput benchmark. Extra arguments go to
# `python -m fused_optim.bench` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec "${FUSED_OPTIM_VENV:-.venv}/bin/python" -m fused_optim.bench "$@"
