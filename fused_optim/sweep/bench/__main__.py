"""``python -m fused_optim.sweep.bench``: the lockstep benchmark."""

from fused_optim.sweep.bench.cli import main

main()
