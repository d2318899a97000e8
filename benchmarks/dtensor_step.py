"""The step on FSDP2's DTensor params: what the host pays per param.

FSDP2 (``fully_shard``) makes every param a DTensor; an optimizer's step
over them goes through DTensor's dispatch, ours through the handler of
``fused_optim/_dtensor.py`` (checks, unwrap, one fused call on the local
shards), torch's through DTensor's sharding propagation. On small shards
that host work, not the update, is the step. This script times the step
on the tensors of `many-small` (2,000 tensors of 256 to 4,096 elements,
or the first ``--tensors`` of them) made DTensors by ``fully_shard`` on a
one-process gloo group (the host work is the same on any number of ranks;
the update is the shard's), with the gradients of a backward (FSDP2's
own, on DTensors), against:

* ours on the same tensors as plain params (what the DTensor path adds);
* torch.optim's ``fused=True`` and ``foreach=True`` steps on DTensors.

With ``--clip``, each step clips the gradients' global norm to 1.0 first:
ours by ``max_grad_norm=1.0`` in the step, torch's by
``torch.nn.utils.clip_grad_norm_`` before it. Gradients are set once;
each round times one step per implementation, in a rotated order, all in
one process (interleaved, as docs/benchmarking.md asks); medians over the
rounds.

    python benchmarks/dtensor_step.py [--optimizer adam] [--tensors 200] [--rounds 30] [--clip]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time

import torch
import torch.distributed as dist

import fused_optim
from fused_optim.bench.workloads import many_small_sizes
from interleaved import OPTIMIZERS, interleaved_times

# name -> (the optimizer's module, extra keywords, params made DTensors)
IMPLEMENTATIONS = {
    "ours": (fused_optim, {}, True),
    "ours, plain params": (fused_optim, {}, False),
    "torch fused": (torch.optim, {"fused": True}, True),
    "torch foreach": (torch.optim, {"foreach": True}, True),
}


class Params(torch.nn.Module):
    def __init__(self, sizes) -> None:
        super().__init__()
        self.tensors = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(n)) for n in sizes)

    def forward(self) -> torch.Tensor:
        # (a loss that reads every param: its backward gives each a gradient)
        return sum((t * t).sum() for t in self.tensors)


def make_step(module, extra: dict, sharded: bool, optimizer: str, sizes, clip: bool):
    """One implementation's step over its own params, gradients set."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = Params(sizes)
    if sharded:
        fully_shard(model)
    params = list(model.parameters())
    # The gradients of a backward: on DTensors, FSDP2's own (reduce-scattered
    # and made DTensors with their param's spec, as in training).
    model().backward()
    assert all(isinstance(p.grad, DTensor) == sharded for p in params)
    class_name, kwargs = OPTIMIZERS[optimizer]
    ours = module is fused_optim
    clip_in_step = {"max_grad_norm": 1.0} if clip and ours else {}
    opt = getattr(module, class_name)(params, **kwargs, **extra, **clip_in_step)

    def step() -> float:
        start = time.perf_counter()
        if clip and not ours:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return time.perf_counter() - start

    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run time with the defaults: about 1 to 2 minutes on a 2-core CPU machine "
               "(100 s measured under load).")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adam")
    parser.add_argument("--tensors", type=int, default=2000,
                        help="the first N of many-small's tensors (default: all 2,000)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clip", action="store_true", help="clip the global norm to 1.0 each step")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or not 1 <= args.tensors <= 2000:
        parser.error("--rounds must be at least 1, --warmup at least 0, --tensors 1 to 2000")
    sizes = many_small_sizes()[:args.tensors]
    own_group = not dist.is_initialized()  # (else the caller's, kept)
    if own_group:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        steps = {}
        for name, (module, extra, sharded) in IMPLEMENTATIONS.items():
            step = make_step(module, extra, sharded, args.optimizer, sizes, args.clip)
            try:
                step()  # (one more warm-up step, every implementation alike)
            except NotImplementedError as error:
                # (torch's fused SGD and Adagrad have no DTensor sharding rule)
                print(f"{name}: not timed, it cannot step DTensors here: "
                      f"{str(error).splitlines()[0]}")
                continue
            steps[name] = step
        times = interleaved_times(steps, args.rounds, args.warmup)
    finally:
        if own_group:
            dist.destroy_process_group()
    ours = statistics.median(times["ours"])
    print(f"{OPTIMIZERS[args.optimizer][0]}, {len(sizes)} tensors ({sum(sizes):,} elements) "
          f"{'clipped to norm 1.0, ' if args.clip else ''}DTensors of fully_shard on 1 gloo rank, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| implementation | median step (us) | per tensor (us) | / ours |\n|---|---:|---:|---:|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median * 1e6:.0f} | {median * 1e6 / len(sizes):.2f} | "
              f"{median / ours:.2f}x |")


if __name__ == "__main__":
    main()
