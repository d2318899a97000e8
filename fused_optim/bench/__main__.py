"""``python -m fused_optim.bench``: see ``--help``."""

from fused_optim.bench.cli import main

main()
