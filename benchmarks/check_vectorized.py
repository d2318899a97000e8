"""Reports which CPU kernel loops the compiler vectorized.

The CPU kernels rely on GCC's auto-vectorizer (csrc/cpu/vectorized_loop.h),
which gives up silently: a branch it cannot if-convert, a conversion it cannot
widen, an aliasing question it cannot answer. This script disassembles the
built extension and, for every AVX2 and AVX-512 instantiation of every
optimizer's element loop, says whether it contains packed ymm/zmm arithmetic.
It is a development check, not a test (another compiler may vectorize
differently and still be right).

    python benchmarks/check_vectorized.py [path/to/_C.so]
"""

import collections
import glob
import os
import re
import subprocess
import sys


def loop_functions(disassembly: str):
    for function in re.split(r"\n(?=[0-9a-f]+ <)", disassembly):
        head = function.split("\n", 1)[0]
        isa = re.search(r"loop_(avx2|avx512)<", head)
        # apply_subrange<Op, Storage<param, state, master, rounding, unscale>, decay, ...>
        kernel = re.search(
            r"apply_subrange<fused_optim::(\w+(?:<[^>]*>)?), fused_optim::cpu::Storage<([^>]*)>, "
            r"\(fused_optim::WeightDecay\)(\d)", head)
        # (PLT entries carry the name too: one indirect jump, no body)
        lines = function.split("\n")
        plt_stub = len(lines) > 1 and re.match(r"\s*[0-9a-f]+:\s*jmp\s+\*", lines[1]) is not None
        if isa and kernel and not plt_stub:
            storage = kernel.group(2).replace("c10::", "").replace(" ", "")
            yield isa.group(1), kernel.group(1), storage, "decay" + kernel.group(3), function


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    default = glob.glob(os.path.join(here, "..", "fused_optim", "_C*.so"))
    path = sys.argv[1] if len(sys.argv) > 1 else (default[0] if default else None)
    if path is None:
        print("no built extension found; build first (scripts/bootstrap.sh)")
        return 2
    disassembly = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", path], capture_output=True, text=True, check=True
    ).stdout
    report = collections.defaultdict(list)
    for isa, kernel, dtype, flags, body in loop_functions(disassembly):
        register = "zmm" if isa == "avx512" else "ymm"
        packed = re.search(rf"v\w+p[sd]\s+.*{register}", body) is not None
        report[(isa, kernel, dtype)].append((flags, packed))
    scalar_loops = 0
    for (isa, kernel, dtype), variants in sorted(report.items()):
        missed = [flags for flags, packed in variants if not packed]
        scalar_loops += len(missed)
        status = "all vectorized" if not missed else "NOT vectorized: " + "; ".join(missed)
        print(f"{kernel:22s} {dtype:44s} {isa:7s} {len(variants) - len(missed)}/{len(variants)}  {status}")
    print(f"{scalar_loops} loop instantiation(s) without packed SIMD arithmetic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
