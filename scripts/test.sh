#!/usr/bin/env bash
# Set-up + the whole test suite: builds the extension, compile-checks the CUDA
# kernels with nvcc when nvcc is present (required when
# FUSED_OPTIM_REQUIRE_NVCC=1, as in CI), then runs pytest. Extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
VENV="${FUSED_OPTIM_VENV:-.venv}"
if command -v nvcc >/dev/null 2>&1 && [ -f scripts/check_cuda_kernels.sh ]; then
  PYTHON="$VENV/bin/python" bash scripts/check_cuda_kernels.sh
elif [ "${FUSED_OPTIM_REQUIRE_NVCC:-0}" = "1" ]; then
  echo "test: FUSED_OPTIM_REQUIRE_NVCC=1 but nvcc or scripts/check_cuda_kernels.sh is missing" >&2
  exit 1
else
  echo "test: nvcc not found; skipping the CUDA kernel compile check"
fi
exec "$VENV/bin/python" -m pytest -q "$@" tests
