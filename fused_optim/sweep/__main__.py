"""``python -m fused_optim.sweep``: which optimizer and learning rate suit a
small CNN on scikit-learn's digits? SGD, momentum, Nesterov, Adagrad,
RMSprop, Adam and AdamW over a learning-rate grid, all trained in one
lockstep run; prints the leaderboard, writes the loss curves (PNG, SVG) and
the results (JSON). No download: the digits ship with scikit-learn."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fused_optim.sweep import Halving, digits, lr_range, run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fused_optim.sweep", description=__doc__)
    parser.add_argument("--model", choices=sorted(digits.MODELS), default="cnn",
                        help="the network (default: cnn)")
    parser.add_argument("--space", default="optimizers",
                        help="'optimizers' (7 optimizers x --lrs learning rates), "
                             "'lr-range:NAME' (K log-spaced lrs for one optimizer, e.g. lr-range:AdamW), "
                             "or a JSON file holding a list of configuration dicts")
    parser.add_argument("--lrs", type=int, default=5, choices=range(1, 6),
                        help="learning rates per optimizer in the 'optimizers' space (default: 5)")
    parser.add_argument("--k", type=int, default=16, help="configurations of an lr-range space")
    parser.add_argument("--steps", type=int, default=3000, help="training steps (default: 3000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--halving", default="none",
                        help="'none', 'auto' (rungs at steps/8, /4, /2, dropping half), "
                             "or comma-separated rung steps (default: none)")
    parser.add_argument("--init-seeds", type=int, default=1,
                        help="train each configuration from this many initializations (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="batch order, dropout, split (default: 0)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="sweep-results", help="output folder (default: sweep-results)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def space_of(args) -> list[dict]:
    if args.space == "optimizers":
        configs = digits.optimizer_space(args.lrs)
    elif args.space.startswith("lr-range:"):
        configs = lr_range({"optimizer": args.space.split(":", 1)[1]}, 1e-5, 1.0, args.k)
    else:
        configs = json.loads(Path(args.space).read_text())
    if args.init_seeds > 1:
        configs = [{**c, "init_seed": s} for c in configs for s in range(args.init_seeds)]
    return configs


def halving_of(args) -> Halving | None:
    if args.halving == "none":
        return None
    if args.halving == "auto":
        return Halving.geometric(args.steps, rungs=3, eta=2)
    return Halving(tuple(int(s) for s in args.halving.split(",")))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train, val = digits.load(seed=args.seed)
    configs = space_of(args)
    out = Path(args.out)
    print(f"{len(configs)} configurations of the digits {args.model}, {args.steps} steps of batch "
          f"{args.batch_size}, in lockstep on {args.device} ({torch.get_num_threads()} threads)",
          file=sys.stderr)
    started = time.perf_counter()
    result = run(digits.MODELS[args.model], configs, train, val=val, steps=args.steps,
                 batch_size=args.batch_size, eval_every=args.eval_every, halving=halving_of(args),
                 seed=args.seed, device=args.device, progress=not args.no_progress)
    seconds = time.perf_counter() - started
    print(result.leaderboard())
    if args.init_seeds > 1:
        print(f"\nover {args.init_seeds} initializations:")
        print(result.over_seeds())
    best = result.best
    print(f"\nbest: {best.name}  (validation loss {best.final_val_loss:.4f}, "
          f"accuracy {best.final_metric:.4f})")
    print(f"      fused_optim.{best.config.optimizer}(model.parameters(), **{best.kwargs})")
    json_path = result.to_json(out / "results.json")
    torch.save(best.state_dict, out / "best_state_dict.pt")
    written = [json_path, out / "best_state_dict.pt"]
    try:
        written += result.plot(out / "loss_curves", title=f"digits {args.model}: {len(configs)} "
                               f"configurations in lockstep, {args.steps} steps")
    except ImportError:
        print("(matplotlib is not installed: no plot)", file=sys.stderr)
    (out / "leaderboard.md").write_text(result.markdown() + "\n")
    written.append(out / "leaderboard.md")
    print(f"\n{seconds:.0f} s; wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
