#!/usr/bin/env bash
# Set-up + the benchmarks. Without arguments: the optimizer-step throughput
# benchmark, then the lockstep sweep benchmark (K configurations in lockstep
# against K sequential torch.optim runs). With arguments: they go to
# `python -m fused_optim.bench` (see --help; `--sweep ...` as the first
# argument runs only the sweep benchmark with its own options).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY="${FUSED_OPTIM_VENV:-.venv}/bin/python"
if [ "$#" -gt 0 ]; then
  exec "$PY" -m fused_optim.bench "$@"
fi
"$PY" -m fused_optim.bench
exec "$PY" -m fused_optim.bench --sweep
