#!/usr/bin/env python3
"""Checks, in the built extension, that every CPU element loop compiled for
AVX-512 or AVX2 is vectorized; with --report, lists them by kernel.

Why: the loops are plain scalar C++ that GCC's auto-vectorizer turns into
SIMD (csrc/cpu/vectorized_loop.h), and it gives up silently: a body left as
a call, a branch it cannot if-convert, a conversion it cannot widen, an
aliasing question it cannot answer. Nothing fails; the loop runs scalar,
3-6x slower, and every test still passes. That happened once (bf16 Adam
with stochastic rounding: Note [inlined body]). The test suite runs this
check (tests/test_cpu_vectorization.py), so it is a failure.

How: each loop_avx512<...> / loop_avx2<...> instantiation, and the
sum_squares_avx512/avx2 reductions, are functions of their own (GCC does
not inline a function compiled for another target into its caller), so the
shipped machine code can be read per loop with `objdump -d -C`. A loop
passes if it does packed floating-point arithmetic (v...ps / v...pd) on the
ISA's full-width registers (zmm for AVX-512, ymm for AVX2) and calls
nothing: a call in a loop means its body was not inlined, and a loop
without packed arithmetic runs one element per iteration. A function that
only returns is a variant no call reaches (Lion's L2 decay mode: Lion's
decay is always decoupled) and passes as empty.

Another compiler may vectorize differently; this check holds the build to
what GCC (the compiler torch's extensions build with on Linux) does.

Usage: check_cpu_vectorization.py [--report] [PATH_TO_EXTENSION.so]
(default: the fused_optim/_C*.so of this checkout). Needs x86-64 and GNU
objdump (binutils, installed with GCC). Exit status 1 lists the loops that
fail.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import subprocess
import sys

# The functions checked, by the name objdump -C gives them ("void
# fused_optim::cpu::loop_avx512<...>(...)"), and the register each one's
# vector code must use.
_CHECKED_FUNCTION = re.compile(
    r"^\S+ fused_optim::cpu::(?:loop|sum_squares)_(?P<isa>avx512|avx2)<")
_WIDE_REGISTER = {"avx512": "zmm", "avx2": "ymm"}
# A packed single or double arithmetic instruction (vmulps, vfmadd231pd,
# vsqrtps, vdivps...), whose operands are then checked for the register.
_PACKED_ARITHMETIC = re.compile(r"^v\w+p[sd]\s")

# "0000000000417f80 <double fused_optim::cpu::sum_squares_avx512<...>(...)>:"
_FUNCTION_START = re.compile(r"^[0-9a-f]+ <(?P<name>.*)>:$")
# What --report groups by: apply_subrange<Op, Storage<param, state, master,
# rounding, unscale>, decay, ...> (the update), measure_block<...> (the
# measuring pass of the ops that read norms), the reductions by their
# element type.
_KERNEL = re.compile(
    r"(?P<loop>apply_subrange|measure_block)<fused_optim::(?P<op>\w+(?:<[^>]*>)?), "
    r"fused_optim::cpu::Storage<(?P<storage>[^>]*)>|sum_squares_avx\w+<(?P<reduced>[^>]*)>")


@dataclasses.dataclass
class LoopCode:
    name: str
    isa: str
    instructions: int = 0
    packed: int = 0  # packed arithmetic on the ISA's full-width registers
    calls: int = 0

    def verdict(self) -> str:
        """'vectorized', 'empty' (only returns) or why it fails."""
        if self.calls:
            return f"calls a function ({self.calls} call(s): the loop body was not inlined)"
        if self.packed:
            return "vectorized"
        if self.instructions <= 1:
            return "empty"
        return (f"scalar (no packed arithmetic on {_WIDE_REGISTER[self.isa]} registers "
                f"in {self.instructions} instructions)")

    def kernel(self) -> str:
        found = _KERNEL.search(self.name)
        if found is None:
            return self.name.split("(", 1)[0]
        if found["reduced"]:
            return f"sum_squares {found['reduced'].replace('c10::', '')}"
        storage = found["storage"].replace("c10::", "").replace(" ", "")
        pass_name = "update" if found["loop"] == "apply_subrange" else "measure"
        return f"{found['op']} {pass_name} {storage}"


def scan(disassembly) -> list[LoopCode]:
    """The checked functions of `disassembly` (lines of `objdump -d -C
    --no-show-raw-insn`), with their instruction counts."""
    loops: list[LoopCode] = []
    current: LoopCode | None = None
    for line in disassembly:
        line = line.rstrip("\n")
        start = _FUNCTION_START.match(line)
        if start:
            checked = _CHECKED_FUNCTION.match(start["name"])
            # (a PLT stub carries the name too: one indirect jump, no code)
            if checked and not start["name"].endswith("@plt"):
                current = LoopCode(start["name"], checked["isa"])
                loops.append(current)
            else:
                current = None
            continue
        if current is None or "\t" not in line:
            continue
        instruction = line.split("\t", 1)[1]
        if instruction.startswith(("nop", "cs nop", "xchg   %ax,%ax", "data16")):
            continue  # (alignment padding after the function)
        current.instructions += 1
        current.packed += (_PACKED_ARITHMETIC.match(instruction) is not None
                           and _WIDE_REGISTER[current.isa] in instruction)
        current.calls += instruction.startswith("call")
    return loops


def report(loops: list[LoopCode]) -> None:
    """Per kernel (op and storage) and ISA: how many of its loops (one per
    decay mode, per master-weights / rounding / unscale variant) are
    vectorized."""
    by_kernel = collections.defaultdict(list)
    for loop in loops:
        by_kernel[(loop.kernel(), loop.isa)].append(loop.verdict())
    for (kernel, isa), verdicts in sorted(by_kernel.items()):
        passed = sum(v in ("vectorized", "empty") for v in verdicts)
        print(f"{kernel:66s} {isa:7s} {passed}/{len(verdicts)}"
              f"{'' if passed == len(verdicts) else '  NOT VECTORIZED'}")


def _default_extension() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = sorted(glob.glob(os.path.join(root, "fused_optim", "_C*.so")))
    if not found:
        sys.exit("check_cpu_vectorization: no fused_optim/_C*.so here; build the extension first")
    return found[0]


def main(argv: list[str]) -> int:
    args = argv[1:]
    if {"-h", "--help"} & set(args):
        print(__doc__.split("\n\n")[0] + "\n\n    python scripts/check_cpu_vectorization.py "
              "[--report] [path/to/_C.so]   (default: the built fused_optim/_C*.so)\n\n"
              "Run time: a few seconds (objdump of the built extension).")
        return 0
    with_report = "--report" in args
    args = [a for a in args if a != "--report"]
    extension = args[0] if args else _default_extension()
    objdump = subprocess.Popen(
        ["objdump", "-d", "-C", "--no-show-raw-insn", extension],
        stdout=subprocess.PIPE, text=True, errors="replace")
    loops = scan(objdump.stdout)
    if objdump.wait() != 0:
        print(f"check_cpu_vectorization: objdump failed on {extension}", file=sys.stderr)
        return 1
    if not loops:
        print(f"check_cpu_vectorization: no AVX2/AVX-512 element loop found in {extension}",
              file=sys.stderr)
        return 1
    if with_report:
        report(loops)
    verdicts = [(loop, loop.verdict()) for loop in loops]
    failing = [(loop, v) for loop, v in verdicts if v not in ("vectorized", "empty")]
    vectorized = sum(v == "vectorized" for _, v in verdicts)
    for loop, why in failing:
        print(f"NOT VECTORIZED: {why}\n  {loop.name}", file=sys.stderr)
    print(f"check_cpu_vectorization: {len(loops)} AVX2/AVX-512 loops in "
          f"{os.path.basename(extension)}: {vectorized} vectorized, "
          f"{len(loops) - vectorized - len(failing)} empty, {len(failing)} not vectorized")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
