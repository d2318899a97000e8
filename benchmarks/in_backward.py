"""The optimizer in backward: a training step whose update runs inside
backward, one param at a time.

torchtune's ``optimizer_in_bwd`` (and torch's private
``_apply_optimizer_in_backward``) give every param its own optimizer and
step it from the param's ``register_post_accumulate_grad_hook`` as soon
as its gradient is ready, then drop the gradient: no step waits for the
whole backward, and no more than one gradient lives at a time. Each step
is then a one-param call, so what it costs is the host's fixed cost per
call, which a multi-tensor step spreads over many tensors. This script
times whole training steps (forward, backward with the steps in it) of an
MLP of ``--layers`` linear layers (two params each) for:

* ours in backward (one fused_optim optimizer per param);
* torch.optim in backward, with ``fused=True`` and with its default
  (``foreach=None``: on CPU tensors, its for-loop);
* ours and torch's ``fused=True`` after backward (one optimizer over all
  params), for what the per-param calls cost against one call.

Each round times one step per implementation, in a rotated order, all in
one process (interleaved, as docs/benchmarking.md asks); medians over the
rounds.

    python benchmarks/in_backward.py [--optimizer adamw] [--layers 32] [--width 256] [--rounds 30]
"""

from __future__ import annotations

import argparse
import time

import torch

import fused_optim
from interleaved import OPTIMIZERS, interleaved_times, print_medians

# name -> (the optimizer's module, extra keywords, stepped in backward)
IMPLEMENTATIONS = {
    "ours in backward": (fused_optim, {}, True),
    "torch fused in backward": (torch.optim, {"fused": True}, True),
    "torch default in backward": (torch.optim, {}, True),
    "ours after backward": (fused_optim, {}, False),
    "torch fused after backward": (torch.optim, {"fused": True}, False),
}


def make_train_step(module, extra: dict, in_backward: bool, optimizer: str, layers: int,
                    width: int):
    """One implementation's training step over its own model, and the model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    batch = torch.randn(8, width)
    class_name, kwargs = OPTIMIZERS[optimizer]
    cls = getattr(module, class_name)
    if in_backward:
        optimizers = {p: cls([p], **kwargs, **extra) for p in model.parameters()}

        def step_in_backward(p) -> None:
            optimizers[p].step()
            optimizers[p].zero_grad()

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(step_in_backward)
    else:
        opt = cls(model.parameters(), **kwargs, **extra)

    def train_step() -> float:
        start = time.perf_counter()
        model(batch).square().mean().backward()
        if not in_backward:
            opt.step()
            opt.zero_grad()
        return time.perf_counter() - start

    return train_step, model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Run time with the defaults: about half a minute on a 2-core CPU machine.")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    parser.add_argument("--layers", type=int, default=32, help="linear layers (default: 32)")
    parser.add_argument("--width", type=int, default=256, help="their width (default: 256)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.layers < 1 or args.width < 1:
        parser.error("--rounds, --layers and --width must be at least 1, --warmup at least 0")
    steps = {name: make_train_step(module, extra, in_backward, args.optimizer, args.layers,
                                   args.width)[0]
             for name, (module, extra, in_backward) in IMPLEMENTATIONS.items()}
    times = interleaved_times(steps, args.rounds, args.warmup)
    params = 2 * args.layers
    elements = args.layers * (args.width * args.width + args.width)
    print(f"{OPTIMIZERS[args.optimizer][0]}, an MLP of {args.layers} layers of width "
          f"{args.width} ({params} params, {elements:,} elements), batch 8, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print_medians(times, "ours in backward", "train step")


if __name__ == "__main__":
    main()
