"""scripts/check_cpu_vectorization.py: every AVX2/AVX-512 element loop of the
built extension is vectorized, and the check tells a vectorized loop from
one left scalar or calling its body (compiled here from
csrc/cpu/vectorized_loop.h with bodies of each kind)."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_cpu_vectorization.py")

needs_x86_objdump = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None
    or shutil.which("readelf") is None,
    reason="reads x86-64 machine code with GNU binutils (objdump, readelf)")


def _check_module():
    spec = importlib.util.spec_from_file_location("check_cpu_vectorization", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclass looks itself up there)
    spec.loader.exec_module(module)
    return module


def _compilers(path: str) -> str:
    """The compilers named in an ELF file's .comment section ("GCC: (...)
    12.2.0", and "clang version ..." when clang compiled some of it)."""
    return subprocess.run(["readelf", "-p", ".comment", path],
                          capture_output=True, text=True).stdout


@needs_x86_objdump
def test_every_avx_loop_of_the_built_extension_is_vectorized():
    from fused_optim import _C

    if "clang" in _compilers(_C.__file__):
        pytest.skip("built with clang: the check holds the build to what GCC vectorizes")
    run = subprocess.run([sys.executable, SCRIPT, _C.__file__],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert " 0 not vectorized" in run.stdout


# Bodies for the real loop templates: one GCC vectorizes, one it cannot
# (each element needs the one before), and one whose call is not inlined.
_LOOPS_CPP = r"""
#include "cpu/vectorized_loop.h"

__attribute__((noinline)) float opaque(float x);
float opaque(float x) { return x * 3.0f; }

using namespace fused_optim::cpu;

void run_all(int64_t n, float* x, float a) {
  vectorized_loop(n, [=](int64_t i) FO_LOOP_BODY { x[i] = x[i] * a + 1.0f; });
  vectorized_loop(n - 1, [=](int64_t i) FO_LOOP_BODY { x[i + 1] = x[i] * a; });
  vectorized_loop(n, [=](int64_t i) { x[i] = opaque(x[i]); });
}
"""


def _gcc() -> str | None:
    """The C++ compiler the build uses, if it is GCC (whose vectorizer the
    bodies below are written against)."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return compiler if "Free Software Foundation" in version else None


@needs_x86_objdump
@pytest.mark.skipif(_gcc() is None, reason="needs GCC as the C++ compiler")
def test_check_tells_vectorized_loops_from_scalar_and_calling_ones(tmp_path):
    source = tmp_path / "loops.cpp"
    source.write_text(_LOOPS_CPP)
    obj = tmp_path / "loops.o"
    subprocess.run([_gcc(), "-std=c++17", "-O3", "-fno-math-errno",
                    "-fno-trapping-math", "-ffp-contract=off", "-c", str(source),
                    "-I", os.path.join(ROOT, "csrc"), "-o", str(obj)], check=True, timeout=120)
    check = _check_module()
    disassembly = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(obj)],
                                 capture_output=True, text=True, check=True).stdout
    verdicts = sorted((loop.name.split("<", 1)[0], loop.verdict().split(" ", 1)[0])
                      for loop in check.scan(disassembly.splitlines()))
    # Per loop, the AVX-512 and the AVX2 compilation; the baseline loop is
    # not checked.
    assert verdicts == sorted(
        [("void fused_optim::cpu::loop_avx512", v) for v in ("vectorized", "scalar", "calls")]
        + [("void fused_optim::cpu::loop_avx2", v) for v in ("vectorized", "scalar", "calls")])
    assert check.main(["check", str(obj)]) == 1


def test_scan_skips_plt_stubs_padding_and_other_functions():
    check = _check_module()
    loop = ("void fused_optim::cpu::loop_avx512<Body>(long, Body const&)")
    disassembly = [
        f"00000000000010 <{loop}@plt>:",
        "  10:\tjmp    *0x2(%rip)",
        f"00000000000020 <{loop}>:",
        "  20:\tvmulps (%r8,%rax,1),%zmm22,%zmm0",
        "  26:\tret",
        "  27:\tnopw   0x0(%rax,%rax,1)",
        "00000000000030 <void fused_optim::cpu::apply_subrange<Op>(char* const*)>:",
        "  30:\tcall   10",
        "00000000000040 <double fused_optim::cpu::sum_squares_avx2<float>(float const*, long, float)>:",
        "  40:\tret",
        "  41:\tcs nopw 0x0(%rax,%rax,1)",
        # Packed arithmetic, but on xmm: not the AVX2 loop's width.
        "00000000000050 <void fused_optim::cpu::loop_avx2<Body>(long, Body const&)>:",
        "  50:\tvaddps %xmm1,%xmm0,%xmm0",
        "  54:\tvmovss %xmm0,(%rdi)",
        "  58:\tjne    50",
        "  5a:\tret",
    ]
    loops = check.scan(disassembly)
    assert [(loop.name, loop.instructions, loop.packed, loop.verdict().split(" ", 1)[0])
            for loop in loops] == [
        (loop, 2, 1, "vectorized"),
        ("double fused_optim::cpu::sum_squares_avx2<float>(float const*, long, float)", 1, 0,
         "empty"),
        ("void fused_optim::cpu::loop_avx2<Body>(long, Body const&)", 4, 0, "scalar"),
    ]
