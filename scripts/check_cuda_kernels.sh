#!/usr/bin/env bash
# Checks the CUDA backend without a GPU (this is what CI runs):
#
#   1. compiles every csrc/cuda/*.cu with nvcc for each arch in $ARCHS
#      (default: sm_80 and sm_90), with the flags the real build uses, and
#      prints each kernel's registers and spills (ptxas -v);
#   2. builds and runs csrc/cuda/tests/multi_tensor_test.cu: host tests of the
#      launch planner and an emulation of the kernels' block body against the
#      update rules (no GPU needed);
#   3. if a Python with torch is found, syntax-checks the torch glue
#      (csrc/cuda/*.cpp) against torch's headers. A CPU-only torch wheel lacks
#      c10/cuda/impl/cuda_cmake_macros.h; a stand-in is provided for this
#      check only.
#
# Exits non-zero if any compilation or test fails. Spills are reported as
# warnings (set STRICT_SPILLS=1 to fail on them).
#
# Environment: NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc),
# ARCHS (default "80 90"), JOBS (parallel compiles, default nproc),
# PYTHON (default python3; SKIP_GLUE_CHECK=1 skips step 3).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -z "${NVCC:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC=nvcc
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  else
    echo "check_cuda_kernels: nvcc not found (set NVCC or CUDA_HOME)" >&2
    exit 2
  fi
fi
ARCHS="${ARCHS:-80 90}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
PYTHON="${PYTHON:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# What torch's CUDAExtension passes to nvcc (COMMON_NVCC_FLAGS in
# torch/utils/cpp_extension.py: without them __half loses its implicit
# conversions, which the kernels must not rely on), and what setup.py adds.
NVCC_FLAGS=(
  -std=c++17 -O3 -lineinfo --fmad=false
  --expt-relaxed-constexpr
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  -DFUSED_OPTIM_WITH_CUDA=1 -Xcompiler -fPIC
  -I csrc/include -I csrc
)

echo "== nvcc: $("$NVCC" --version | tail -n 1)"
failed=0

# --- 1. kernels ---------------------------------------------------------------

sources=(csrc/cuda/*.cu)
if [[ ! -e "${sources[0]}" ]]; then
  echo "check_cuda_kernels: no csrc/cuda/*.cu files" >&2
  exit 2
fi

compile() {  # compile SOURCE ARCH -> $WORK/<name>.sm_<arch>.{o,log,rc}
  local src="$1" arch="$2"
  local base="$WORK/$(basename "$src" .cu).sm_$arch"
  "$NVCC" "${NVCC_FLAGS[@]}" -Xptxas -v \
    -gencode "arch=compute_$arch,code=sm_$arch" \
    -c "$src" -o "$base.o" >"$base.log" 2>&1
  echo $? >"$base.rc"
}

echo "== compiling ${#sources[@]} files for sm_${ARCHS// /, sm_} ($JOBS jobs)"
running=0
for src in "${sources[@]}"; do
  for arch in $ARCHS; do
    compile "$src" "$arch" &
    running=$((running + 1))
    if ((running >= JOBS)); then
      wait -n
      running=$((running - 1))
    fi
  done
done
wait

demangle() { if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi; }

# One line per kernel: registers, spills, and a short name such as
# "AdamOp<true> bf16 fp32" (element op, param dtype, state dtype; from the
# demangled multi_tensor_kernel<Op, P, S, Meta>).
report() {  # report LOG
  awk '
    /Compiling entry function/ {
      match($0, /_Z[A-Za-z0-9_]*/); name = substr($0, RSTART, RLENGTH); next
    }
    /bytes spill stores/ { stores = $5; loads = $9; next }
    /Used [0-9]+ registers/ {
      for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1)
      printf "%s\t%s\t%s\t%s\n", regs, stores, loads, name
    }' "$1" | demangle |
    sed -E -e 's/void fused_optim::cuda::multi_tensor_kernel<fused_optim::([^,]*(<[^>]*>)?), ([A-Za-z_0-9]+), ([A-Za-z_0-9]+), .*/\1 \3 \4/' \
      -e 's/void fused_optim::cuda::step_kernel<.*/step_kernel/' \
      -e 's/__nv_bfloat16/bf16/g; s/__half/fp16/g; s/ float/ fp32/g; s/ double/ fp64/g'
}

spills=0
for src in "${sources[@]}"; do
  for arch in $ARCHS; do
    base="$WORK/$(basename "$src" .cu).sm_$arch"
    if [[ "$(cat "$base.rc")" != 0 ]]; then
      echo "FAILED: $src for sm_$arch"
      cat "$base.log"
      failed=1
      continue
    fi
    echo "-- $src sm_$arch  (registers / spill stores / spill loads / kernel param state)"
    while IFS=$'\t' read -r regs stores loads name; do
      printf '   %4s  %4s  %4s  %s\n' "$regs" "$stores" "$loads" "$name"
      if [[ "$stores" != 0 || "$loads" != 0 ]]; then spills=$((spills + 1)); fi
    done < <(report "$base.log")
  done
done
if ((spills > 0)); then
  echo "WARNING: $spills kernel(s) spill registers (see above)"
  if [[ "${STRICT_SPILLS:-0}" == 1 ]]; then failed=1; fi
fi

# --- 2. host tests --------------------------------------------------------------

echo "== host tests: csrc/cuda/tests/multi_tensor_test.cu"
if "$NVCC" "${NVCC_FLAGS[@]}" -Xcompiler -fno-strict-aliasing \
    -Xcompiler -Wno-unknown-pragmas \
    csrc/cuda/tests/multi_tensor_test.cu -o "$WORK/multi_tensor_test" \
    >"$WORK/test_build.log" 2>&1; then
  if ! "$WORK/multi_tensor_test"; then
    echo "FAILED: csrc/cuda/tests/multi_tensor_test.cu"
    failed=1
  fi
else
  echo "FAILED: building csrc/cuda/tests/multi_tensor_test.cu"
  cat "$WORK/test_build.log"
  failed=1
fi

# --- 3. glue syntax check -------------------------------------------------------

glue=(csrc/cuda/*.cpp)
if [[ "${SKIP_GLUE_CHECK:-0}" == 1 ]]; then
  echo "== glue check skipped (SKIP_GLUE_CHECK=1)"
elif [[ ! -e "${glue[0]}" ]]; then
  echo "== glue check: no csrc/cuda/*.cpp"
elif ! torch_includes="$("$PYTHON" -c '
from torch.utils.cpp_extension import include_paths
print("\n".join(include_paths()))' 2>/dev/null)"; then
  echo "== glue check skipped: no torch for $PYTHON"
else
  echo "== glue syntax check: ${glue[*]}"
  mkdir -p "$WORK/stub/c10/cuda/impl"
  printf '#pragma once\n' >"$WORK/stub/c10/cuda/impl/cuda_cmake_macros.h"
  # Where nvcc finds cuda_runtime.h (nvcc may be a wrapper script, so ask it).
  cuda_include="$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 |
    sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1)"
  include_flags=(-I "$WORK/stub")
  while IFS= read -r dir; do include_flags+=(-isystem "$dir"); done <<<"$torch_includes"
  include_flags+=(-isystem "$cuda_include" -I csrc/include -I csrc)
  for src in "${glue[@]}"; do
    # C++20: torch's extension build compiles C++ with -std=c++20.
    if ! "${CXX:-g++}" -std=c++20 -fsyntax-only -Wall -DFUSED_OPTIM_WITH_CUDA=1 \
        "${include_flags[@]}" "$src" >"$WORK/glue.log" 2>&1; then
      if grep -q "No such file or directory" "$WORK/glue.log"; then
        echo "   skipped $src: this torch lacks a CUDA header:"
        grep "No such file or directory" "$WORK/glue.log" | head -n 3
      else
        echo "FAILED: $src"
        cat "$WORK/glue.log"
        failed=1
      fi
    else
      echo "   ok $src"
    fi
  done
fi

if ((failed)); then
  echo "check_cuda_kernels: FAILED"
  exit 1
fi
echo "check_cuda_kernels: OK"
