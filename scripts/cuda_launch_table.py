"""The table of csrc/cuda/README.md ("Tensors per launch"), from the built
extension: per op and set of state lists a call gives, the operands per
element, sizeof(Hyper), the hyperparameter slots and tensors of one launch,
and sizeof(TensorListMeta) (fused_optim._C.launch_capacities, computed by
csrc/launch_capacity.cpp from multi_tensor_plan.h: a CPU-only build gives
the same numbers). tests/test_launch_capacity.py checks that the README
holds this table.

    python scripts/cuda_launch_table.py
"""

from __future__ import annotations

import os
import sys

HEADER = ("| op | state lists given | operands (kN) | sizeof(Hyper) | slots | tensors per launch "
          "| sizeof(TensorListMeta) |\n|---|---|---|---|---|---|---|")


def table(rows) -> str:
    lines = [HEADER]
    for r in rows:
        lists = ", ".join(f"`{name}`" for name in r["state_lists"]) or "(none)"
        lines.append(f"| `{r['op']}` | {lists} | {r['operands']} | {r['hyper_bytes']} "
                     f"| {r['slots']} | {r['tensors']} | {r['meta_bytes']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:]:
        print(__doc__)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    # (the checkout's fused_optim, built in place)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fused_optim import _C

    print(table(_C.launch_capacities()), end="")
