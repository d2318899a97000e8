#!/usr/bin/env bash
# Set-up + the benchmarks. Without arguments: the optimizer-step throughput
# benchmark, then the lockstep sweep benchmark (K configurations in lockstep
# against K sequential torch.optim runs), about 10 minutes on a 2-core CPU,
# printed only. With arguments: they go to `python -m fused_optim.bench`
# (see --help; `--sweep ...` as the first argument runs only the sweep
# benchmark with its own options). Relative paths (--json, --markdown) are
# the caller's: the benchmark runs in the folder this script is called from.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${FUSED_OPTIM_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac
PY="$VENV/bin/python"
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  # (no set-up for the help: this header, then the benchmark's own where built)
  sed -n '2,8s/^# \{0,1\}//p' "$0"
  if [ -x "$PY" ] && "$PY" -c "import fused_optim" 2>/dev/null; then
    echo
    exec "$PY" -m fused_optim.bench "$@"
  fi
  echo "(python -m fused_optim.bench --help shows every option once set up: bash $0 --repeats 1 --workloads tiny)"
  exit 0
fi
bash "$REPO/scripts/bootstrap.sh"
if [ "$#" -gt 0 ]; then
  exec "$PY" -m fused_optim.bench "$@"
fi
"$PY" -m fused_optim.bench
exec "$PY" -m fused_optim.bench --sweep
