"""The wrappers of torch.distributed that step a functional twin of the
class they are given take ours as they take torch.optim's.

Three of them never construct the optimizer class they are handed: DDP's
``_register_fused_optim`` (the step of each param right after its gradient
is reduced), ``ZeroRedundancyOptimizer(overlap_with_ddp=True)`` (the step
of each bucket inside DDP's communication hook) and, under TorchScript, the
RPC ``DistributedOptimizer``. They look the class up in
``torch.distributed.optim.utils.functional_optim_map``, keyed by
torch.optim's classes, and step the functional optimizer found there
(gradients handed in, one param or bucket at a time). Without an entry
``fused_optim.AdamW`` is refused where ``torch.optim.AdamW`` is taken
("no supported functional optimizer equivalent").

So each of our classes with a torch.optim namesake in that table is
registered under the same functional optimizer (SGD, Adam, AdamW, Adagrad,
RMSprop; torch has none for RAdam and NAdam, nor do we): these wrappers
then run with ``fused_optim.X`` exactly what they run with
``torch.optim.X``, torch's functional code, not our kernels, and take the
same keywords (torch's; our precision keywords are refused there as
``fused=True`` is). The table is filled in when torch.distributed.optim is
imported (about a second; _on_import.py).
"""

from __future__ import annotations

import torch

from fused_optim import _on_import

_MODULE = "torch.distributed.optim.utils"


def register_when_imported(classes) -> None:
    """Registers, once the table exists, each class of ``classes`` (ours)
    whose torch.optim namesake has a functional twin."""
    if not torch.distributed.is_available():
        return

    def register() -> None:
        from torch.distributed.optim.utils import functional_optim_map, register_functional_optim

        for cls in classes:
            twin = functional_optim_map.get(getattr(torch.optim, cls.__name__, None))
            if twin is not None:
                register_functional_optim(cls, twin)

    _on_import.when_imported(_MODULE, register)
