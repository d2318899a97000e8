"""The register table of csrc/cuda/README.md ("Registers"), from the output of
scripts/check_cuda_kernels.sh: registers per thread (sm_80 / sm_90) per
element op and (param / state) dtype, with the kernels that spill marked *
and their spill bytes listed below the table.

    bash scripts/check_cuda_kernels.sh > /tmp/check.log
    python scripts/cuda_register_table.py /tmp/check.log
"""

from __future__ import annotations

import re
import sys

# Readable labels of the kernels, in the table's order (row label, kernel
# name as check_cuda_kernels.sh prints it). A kernel of the log missing here
# (a new op's) gets a row of its own under its kernel name, after these.
LABELS = [
    ("adam", "AdamOp<false>"), ("adam amsgrad", "AdamOp<true>"),
    ("sgd", "SgdOp<false,false>"), ("sgd momentum", "SgdOp<true,false>"),
    ("sgd nesterov", "SgdOp<true,true>"), ("adagrad", "AdagradOp"),
    ("rmsprop", "RmspropOp<false,false>"), ("rmsprop momentum", "RmspropOp<false,true>"),
    ("rmsprop centered", "RmspropOp<true,false>"),
    ("rmsprop centered + momentum", "RmspropOp<true,true>"),
    ("radam", "RadamOp"), ("nadam", "NadamOp"), ("lion", "LionOp"),
    ("lars", "LarsOp<false,false>"), ("lars momentum", "LarsOp<true,false>"),
    ("lars nesterov", "LarsOp<true,true>"), ("lamb", "LambOp"),
]
PAIRS = [("fp32", "fp32"), ("fp32", "bf16"), ("fp64", "fp64"), ("fp16", "fp16"),
         ("fp16", "fp32"), ("fp16", "bf16"), ("bf16", "bf16"), ("bf16", "fp32")]
ARCHS = ("80", "90")


def parse(lines) -> dict:
    """{(kernel, param, state, arch): (registers, spill stores, spill loads)}"""
    data, arch = {}, None
    for line in lines:
        m = re.match(r"-- csrc/cuda/\w+\.cu sm_(\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s+(\d+)\s+(\d+)\s+(\d+)\s+(\w+(?:<[^>]*>)?)\s+(\w+)\s+(\w+)$", line)
        if m and arch:
            regs, stores, loads, kernel, param, state = m.groups()
            data[(kernel.replace(" ", ""), param, state, arch)] = (int(regs), int(stores), int(loads))
    return data


def rows(data: dict) -> list[tuple[str, str]]:
    """(label, kernel) of every element-op kernel of the log: LABELS' first,
    then the others in the log's order, each under its kernel name."""
    labelled = {kernel for _, kernel in LABELS}
    found = list(dict.fromkeys(kernel for kernel, *_ in data))
    return ([(label, kernel) for label, kernel in LABELS if kernel in found]
            + [(kernel, kernel) for kernel in found if kernel not in labelled])


def table(data: dict) -> str:
    out = ["| kernel | " + " | ".join(f"{p}/{s}" for p, s in PAIRS) + " |",
           "|---|" + "---|" * len(PAIRS)]
    spills = []
    for label, kernel in rows(data):
        cells = []
        for param, state in PAIRS:
            found = [data.get((kernel, param, state, arch)) for arch in ARCHS]
            if None in found:  # (an op without state has only state = param)
                cells.append("-")
                continue
            spilled = any(f[1] for f in found)
            cells.append(" / ".join(str(f[0]) for f in found) + (" *" if spilled else ""))
            if spilled:
                spills.append(f"- {label} {param}/{state}: " + ", ".join(
                    f"sm_{arch} {f[1]}/{f[2]} B" for arch, f in zip(ARCHS, found)))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n\n" + "\n".join(spills)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    try:
        with open(sys.argv[1]) as log:
            print(table(parse(log)))
    except OSError as error:
        sys.exit(f"cuda_register_table: {sys.argv[1]}: {error.strerror}")
