#!/usr/bin/env bash
# One GPU session (written for an H200: sm_90, 16 cores): builds fused_optim
# in place with its CUDA kernels, then runs the checks in order of value.
# Each stage is capped, and cut to the session's deadline (BUDGET_S after the
# start); a stage with under MIN_STAGE_S seconds left is skipped.
#
#   stage        cap (s)  what
#   info           30     nvidia-smi, nvcc, torch, CPUs, memory, commit
#   precheck       60     torch has CUDA and sees a GPU, nvcc is there (else stop)
#   toolchain      60     scripts/toolchain_probe.py: which compiler and link
#                         (CXX, LDSHARED) build an extension whose errors raise
#                         rather than crash; the build uses the first that does
#   build         330     MAX_JOBS=<all cores> TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1
#                         python3 setup.py build_ext --inplace (else stop)
#   import         60     the checkout's fused_optim imports, cuda_built() (else stop)
#   smoke          90     first launches, synchronous (CUDA_LAUNCH_BLOCKING=1), -x:
#                         tests/test_cuda.py -k "bit_for_bit and float32"
#   memcheck      150     only if smoke failed: compute-sanitizer memcheck of the
#                         first failing test (the caching allocator off)
#   test_cuda     240     tests/test_cuda.py, junit xml
#   kernel         90     benchmarks/gpu_kernel_timing.py: CUDA-graph replay of the
#                         step against a device-to-device copy, and torch's peer
#   suite         150     the other modules' device-parametrized tests on CUDA
#                         (-k cuda), junit xml
#   bench_large   150     python3 -m fused_optim.bench --device cuda, workload large
#   bench_small   150     the same, workloads many-small and many-groups
#
# The test stages run with scripts/crash_backtrace.c preloaded (built in the
# precheck stage when a C compiler is there): a stage that dies of a signal
# leaves the native stack in its log, and <stage>.stack beside it holds
# fused_optim's frames as function, file and line.
#
# A stage's time runs out with SIGINT (pytest then still writes its junit xml
# and summary; the benchmarks print results as they come), then SIGKILL
# GRACE_S seconds later. (timeout(1) handles SIGINT itself, so the command
# starts with SIGINT's default action even where this script runs with
# SIGINT ignored, as a background job does.)
#
# Results under $OUT: summary.txt (one line per stage, appended as each
# ends), kernel_timing.json, bench_large.{json,md}, bench_small.{json,md},
# and logs.tar.gz: <stage>.log per stage, <stage>.stack after a crash,
# test_cuda.xml, suite_cuda.xml, the benchmarks' plots. (The device tool
# brings back at most 8 files.)
#
# Usage (on the device machine, from anywhere):
#   bash scripts/gpu_check.sh          # the device tool: timeout_s=570
# Environment: OUT (default: a new mktemp -d), BUDGET_S (default 540),
# PYTHON (default python3), MAX_JOBS (default: all cores),
# TORCH_CUDA_ARCH_LIST (default 9.0; precheck warns when the GPU differs),
# GRACE_S (default 15), MIN_STAGE_S (default 20).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-540}"
GRACE_S="${GRACE_S:-15}"
MIN_STAGE_S="${MIN_STAGE_S:-20}"
START=$(date +%s)
END=$((START + BUDGET_S))
FAILED_STAGES=()

# `python -m` puts the working directory (the checkout) first on sys.path.
# PYTEST gains LD_PRELOAD of the crash handler once it is built (main).
PYTEST=("$PY" -m pytest)
PYTEST_PLAIN=("$PY" -m pytest)

# stage NAME CAP_S CMD...: runs CMD (stdin /dev/null, stdout and stderr to
# $OUT/NAME.log) for at most CAP_S seconds and never past the deadline, then
# appends one line to $OUT/summary.txt. Returns CMD's status; 124 if it was
# cut, 125 if skipped for lack of time.
stage() {
  local name=$1 cap=$2 left t start rc status elapsed extra
  shift 2
  left=$((END - $(date +%s) - GRACE_S))
  t=$((left < cap ? left : cap))
  if ((t < MIN_STAGE_S)); then
    printf '%-12s SKIPPED   (%ss left before the deadline)\n' "$name" "$((left + GRACE_S))" |
      tee -a "$OUT/summary.txt"
    return 125
  fi
  echo "== $name (up to ${t}s; $OUT/$name.log)"
  start=$(date +%s)
  timeout -s INT -k "$GRACE_S" "$t" "$@" </dev/null >"$OUT/$name.log" 2>&1
  rc=$?
  elapsed=$(($(date +%s) - start))
  # pytest's closing line ("3 failed, 120 passed in 41.2s"), if any
  extra=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' \
    "$OUT/$name.log" | tail -n 1 | tr -d '=' | sed -E 's/^ +| +$//g')
  case $rc in
    0) status=ok ;;
    124 | 137) status="CUT" ;;
    *) status=FAILED ;;
  esac
  if ((rc != 0)); then FAILED_STAGES+=("$name"); fi
  if ((rc > 128 && rc != 137)); then  # died of a signal (137: timeout's KILL)
    symbolize "$OUT/$name.log" >"$OUT/$name.stack" 2>&1
    extra="(signal $((rc - 128)); native stack in $name.stack)"
  fi
  # pytest's closing line ("3 failed, 120 passed in 41.2s"), if any
  printf '%-12s %-9s rc=%-3s %4ss (cap %ss)  %s\n' "$name" "$status" "$rc" "$elapsed" "$t" "$extra" |
    tee -a "$OUT/summary.txt"
  tail -n 6 "$OUT/$name.log" | sed 's/^/    /'
  return "$rc"
}

# symbolize LOG: crash_backtrace.c's frames in LOG, demangled; those in
# fused_optim's extension as function, file and line (addr2line).
symbolize() {
  local log=$1 frame so offset
  sed -n '/== native stack/,$p' "$log" | { command -v c++filt >/dev/null && c++filt || cat; }
  command -v addr2line >/dev/null || return 0
  echo "== fused_optim frames"
  grep -oE '[^ ]*fused_optim/_C[^ (]*\.so\(\+0x[0-9a-f]+\)' "$log" | while read -r frame; do
    so=${frame%%(*}
    offset=${frame##*(+}
    offset=${offset%)}
    # (a return address: the call is the byte before it)
    printf '%s  ' "$offset"
    addr2line -f -C -i -p -e "$so" "$(printf '0x%x' $((offset - 1)))"
  done
}

# pack: the logs, the junit files and the plots into one logs.tar.gz.
pack() {
  local f files=()
  for f in "$OUT"/*.log "$OUT"/*.stack "$OUT"/*.xml "$OUT"/*.png "$OUT"/*.svg; do
    [[ -e $f ]] && files+=("$(basename "$f")")
  done
  ((${#files[@]})) || return 0
  tar -C "$OUT" -czf "$OUT/logs.tar.gz" "${files[@]}" && (cd "$OUT" && rm -f "${files[@]}")
}

stop() {  # stop REASON: the remaining stages cannot run
  echo "STOPPED: $1" | tee -a "$OUT/summary.txt"
  finish
  exit 1
}

finish() {
  echo "total $(($(date +%s) - START))s of ${BUDGET_S}s; results in $OUT" | tee -a "$OUT/summary.txt"
  pack
  echo "== summary.txt"
  cat "$OUT/summary.txt"
  ls -l "$OUT"
}

# crash_handler: builds scripts/crash_backtrace.c (in a temporary folder:
# not brought back) and preloads it into PYTEST; without a C compiler the
# tests run as they are.
crash_handler() {
  local lib cc message
  lib="$(mktemp -d)/crash_backtrace.so"
  cc="$(command -v "${CC:-cc}" || command -v gcc || command -v "${CXX:-c++}" || command -v g++ || true)"
  if [[ -n $cc ]] && "$cc" -shared -fPIC -O1 -o "$lib" "$ROOT/scripts/crash_backtrace.c"; then
    PYTEST=(env LD_PRELOAD="$lib" "$PY" -m pytest)
    message="crash handler: $lib"
  else
    message="crash handler: none (no C compiler): a crash leaves Python's frames only"
  fi
  echo "$message" | tee -a "$OUT/summary.txt"
}

# The other test modules in the order to run them on CUDA: the op-level
# tests and the API paths first; test_parity.py (much of which test_cuda.py
# already covers) and the multi-process tests last.
suite_files() {
  local f
  local -A listed=()
  for f in tests/test_ops.py tests/test_torch_compat.py tests/test_sparse_complex.py \
    tests/test_state_dict.py tests/test_parity.py; do
    if [[ -e $f ]]; then
      echo "$f"
      listed[$f]=1
    fi
  done
  for f in tests/test_*.py; do
    if [[ $f != tests/test_cuda.py && -z ${listed[$f]:-} ]]; then echo "$f"; fi
  done
}

main() {
  cd "$ROOT" || exit 2
  OUT="${OUT:-$(mktemp -d)}"
  mkdir -p "$OUT" || exit 2
  export PYTHONUNBUFFERED=1
  local archs="${TORCH_CUDA_ARCH_LIST:-9.0}"  # sm_90: H100/H200
  # The checkout's fused_optim, whatever else is installed.
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  {
    echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), budget ${BUDGET_S}s"
    echo "commit: $(git log -1 --format='%h %s' 2>/dev/null || echo 'unknown (no git)')"
  } | tee "$OUT/summary.txt"

  # shellcheck disable=SC2016  # (expanded by the inner bash: $1 is "$PY")
  stage info 30 bash -c '
    nvidia-smi; echo
    command -v nvcc && nvcc --version; echo
    "$1" -c "import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda);
print(torch.cuda.get_device_properties(0) if torch.cuda.is_available() else \"no GPU visible\")"
    echo "cores: $(nproc)"; free -g; df -h .
    git status --short 2>/dev/null | head -n 20' _ "$PY"

  stage precheck 60 env TORCH_CUDA_ARCH_LIST="$archs" "$PY" -c '
import os, shutil, torch
from torch.utils import cpp_extension
assert torch.version.cuda, f"torch {torch.__version__} is a CPU-only build"
assert torch.cuda.is_available(), "torch sees no GPU"
assert cpp_extension.CUDA_HOME, "torch finds no CUDA toolkit (nvcc); set CUDA_HOME"
if not shutil.which("ninja"):
    print("WARNING: no ninja: the build compiles one file at a time and may not fit its cap")
archs = os.environ["TORCH_CUDA_ARCH_LIST"]
major, minor = torch.cuda.get_device_capability(0)
if f"{major}.{minor}" not in archs.replace(";", " ").split():
    print(f"WARNING: the GPU is sm_{major}{minor} but the build is for {archs}: set TORCH_CUDA_ARCH_LIST")
print("ok:", torch.cuda.get_device_name(0), "CUDA_HOME", cpp_extension.CUDA_HOME)' ||
    stop "no usable CUDA setup (precheck.log)"

  crash_handler

  # The image's default compiler once built an extension that crashed on its
  # first error message (a private libstdc++ copy: toolchain_probe.py).
  local toolchain_env
  toolchain_env="$(mktemp)"
  if stage toolchain 60 "$PY" scripts/toolchain_probe.py --env-out "$toolchain_env"; then
    # shellcheck disable=SC1090  # (written by toolchain_probe.py)
    source "$toolchain_env"
    sed -n '1p' "$toolchain_env" | tee -a "$OUT/summary.txt"
  else
    echo "toolchain: no candidate raises cleanly; building as configured (errors may crash)" |
      tee -a "$OUT/summary.txt"
  fi

  # In place: the tests and the benchmarks import ./fused_optim. With debug
  # info (CFLAGS=-g; setup.py leaves it out otherwise), so that symbolize
  # gives a crash's file and line.
  stage build 330 env MAX_JOBS="${MAX_JOBS:-$(nproc)}" TORCH_CUDA_ARCH_LIST="$archs" FORCE_CUDA=1 \
    CFLAGS="${CFLAGS:+$CFLAGS }-g" \
    "$PY" setup.py build_ext --inplace || stop "the build failed or was cut (build.log)"

  stage import 60 "$PY" -c '
import os, torch, fused_optim
where = os.path.realpath(fused_optim.__file__)
print("fused_optim from", where)
assert where.startswith(os.path.realpath(os.getcwd()) + os.sep), "not the checkout: " + where
assert fused_optim.cuda_built(), "this build has no CUDA kernels (fused_optim.cuda_built())"
print("CUDA build, on", torch.cuda.get_device_name(0))' ||
    stop "the checkout's fused_optim has no CUDA kernels (import.log)"

  # First launches synchronous, so that an error points at its kernel.
  if ! stage smoke 90 env CUDA_LAUNCH_BLOCKING=1 TORCH_SHOW_CPP_STACKTRACES=1 \
    "${PYTEST[@]}" -x -v -rfE tests/test_cuda.py -k "bit_for_bit and float32"; then
    # memcheck on the first failing test (or the smoke's selection if the
    # process died before its summary), each tensor its own allocation so
    # that out-of-bounds accesses are not hidden inside a cached block.
    local san target c
    san="$(command -v compute-sanitizer || true)"
    for c in "${CUDA_HOME:-}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
      if [[ -z $san && -x $c ]]; then san=$c; fi
    done
    target=$(grep -m 1 -oE '^(FAILED|ERROR) tests/test_cuda.py::[^ ]+' "$OUT/smoke.log" | cut -d' ' -f2)
    if [[ -z $san ]]; then
      echo "memcheck     SKIPPED   (no compute-sanitizer)" | tee -a "$OUT/summary.txt"
    elif [[ -n $target ]]; then
      stage memcheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck \
        --print-limit 20 --error-exitcode 99 "${PYTEST_PLAIN[@]}" -x -q "$target"
    else
      stage memcheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool memcheck \
        --print-limit 20 --error-exitcode 99 "${PYTEST_PLAIN[@]}" -x -q tests/test_cuda.py \
        -k "bit_for_bit and float32"
    fi
  fi

  stage test_cuda 240 "${PYTEST[@]}" -q -rfE --durations=15 tests/test_cuda.py \
    --junitxml="$OUT/test_cuda.xml"

  stage kernel 90 "$PY" benchmarks/gpu_kernel_timing.py --json "$OUT/kernel_timing.json"

  local suite
  mapfile -t suite < <(suite_files)
  stage suite 150 "${PYTEST[@]}" -q -rfE -k cuda "${suite[@]}" --junitxml="$OUT/suite_cuda.xml"

  # shellcheck disable=SC2054  # (commas inside option values)
  local bench=("$PY" -m fused_optim.bench --device cuda --dtypes fp32,bf16 --repeats 21
    --impls fused_optim,torch-fused,torch-foreach)
  stage bench_large 150 "${bench[@]}" --workloads large \
    --json "$OUT/bench_large.json" --markdown "$OUT/bench_large.md"
  stage bench_small 150 "${bench[@]}" --workloads many-small,many-groups \
    --json "$OUT/bench_small.json" --markdown "$OUT/bench_small.md"

  if ((${#FAILED_STAGES[@]})); then
    echo "failed or cut: ${FAILED_STAGES[*]}" | tee -a "$OUT/summary.txt"
  fi
  finish
  ((${#FAILED_STAGES[@]} == 0))
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
