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

from fused_optim.bench.cli import device_name, positive_int, unwritable
from fused_optim.sweep import Halving, digits, lr_range, run
from fused_optim.sweep.space import OPTIMIZERS, make_configs


def parse_args(argv=None) -> argparse.Namespace:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.k is not None and not args.space.startswith("lr-range:"):
        parser.error("--k sets the size of an lr-range space (--space lr-range:NAME)")
    if args.lrs is not None and args.space != "optimizers":
        parser.error("--lrs applies to the 'optimizers' space")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available to this torch")
    try:
        args.configs = space_of(args)
        args.halving_rule = halving_of(args)
    except ValueError as error:
        parser.error(str(error))
    train_size = len(digits.load(seed=args.seed)[0][0])
    if args.batch_size > train_size:
        parser.error(f"--batch-size {args.batch_size}: the training split holds {train_size} "
                     "examples")
    why = unwritable(Path(args.out))
    if why:
        parser.error(f"--out {args.out}: cannot write there ({why})")
    return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fused_optim.sweep", description=__doc__,
        epilog="With the defaults (35 configurations, 3000 steps of the CNN) it takes about "
               "2 minutes on a 2-core CPU; the time grows with --steps and the configurations.")
    parser.add_argument("--model", choices=sorted(digits.MODELS), default="cnn",
                        help="the network (default: cnn)")
    parser.add_argument("--space", default="optimizers",
                        help="'optimizers' (7 optimizers x --lrs learning rates), "
                             "'lr-range:NAME' (--k log-spaced lrs for one optimizer, NAME one of "
                             f"{', '.join(OPTIMIZERS)}), or a JSON file holding a list of "
                             "configuration dicts (default: optimizers)")
    parser.add_argument("--lrs", type=int, choices=range(1, 6),
                        help="learning rates per optimizer in the 'optimizers' space (default: 5)")
    parser.add_argument("--k", type=positive_int,
                        help="configurations of an lr-range space (default: 16)")
    parser.add_argument("--steps", type=positive_int, default=3000,
                        help="training steps (default: 3000)")
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="examples per step, at most the training split's (default: 64)")
    parser.add_argument("--eval-every", type=positive_int, default=50,
                        help="steps between validations (default: 50)")
    parser.add_argument("--halving", default="none",
                        help="'none', 'auto' (rungs at steps/8, /4, /2, dropping half), "
                             "or comma-separated rung steps (default: none)")
    parser.add_argument("--init-seeds", type=positive_int, default=1,
                        help="train each configuration from this many initializations, ranked by "
                             "the mean (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="batch order, dropout, split (default: 0)")
    parser.add_argument("--device", type=device_name, default="cpu",
                        help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--out", default="sweep-results", help="output folder (default: sweep-results)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def space_of(args) -> list[dict]:
    """The configuration dicts of ``--space`` (ValueError: why not)."""
    if args.space == "optimizers":
        configs = digits.optimizer_space(5 if args.lrs is None else args.lrs)
    elif args.space.startswith("lr-range:"):
        name = args.space.split(":", 1)[1]
        by_lower = {n.lower(): n for n in OPTIMIZERS}
        if name.lower() not in by_lower:
            raise ValueError(f"--space lr-range:NAME: NAME must be one of {', '.join(OPTIMIZERS)}, "
                             f"got {name!r}")
        configs = lr_range({"optimizer": by_lower[name.lower()]}, 1e-5, 1.0,
                           16 if args.k is None else args.k)
    else:
        path = Path(args.space)
        if not path.is_file():
            raise ValueError(f"--space {args.space!r} is neither 'optimizers', 'lr-range:NAME' nor "
                             "a file")
        try:
            configs = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"--space {args.space}: not a JSON file ({error})") from None
        if not isinstance(configs, list):
            raise ValueError(f"--space {args.space}: the file must hold a list of configuration "
                             f"dicts, not a {type(configs).__name__}")
    if args.init_seeds > 1:
        configs = [{**c, "init_seed": s} for c in configs for s in range(args.init_seeds)]
    make_configs(configs)  # (checked now: ValueError names the configuration)
    return configs


def halving_of(args) -> Halving | None:
    """The ``--halving`` rule (ValueError: why not)."""
    if args.halving == "none":
        return None
    if args.halving == "auto":
        return Halving.geometric(args.steps, rungs=3, eta=2)
    try:
        rungs = tuple(int(s) for s in args.halving.split(","))
    except ValueError:
        raise ValueError(f"--halving must be 'none', 'auto' or comma-separated steps, "
                         f"got {args.halving!r}") from None
    if max(rungs) >= args.steps:
        raise ValueError(f"--halving: every rung must come before the last step ({args.steps}), "
                         f"got {args.halving}")
    return Halving(rungs)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    train, val = digits.load(seed=args.seed)
    configs = args.configs
    out = Path(args.out)
    print(f"{len(configs)} configurations of the digits {args.model}, {args.steps} steps of batch "
          f"{args.batch_size}, in lockstep on {args.device} ({torch.get_num_threads()} threads)",
          file=sys.stderr)
    started = time.perf_counter()
    result = run(digits.MODELS[args.model], configs, train, val=val, steps=args.steps,
                 batch_size=args.batch_size, eval_every=args.eval_every, halving=args.halving_rule,
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
    leaderboard = result.markdown() + "\n"
    if args.init_seeds > 1:
        leaderboard += (f"\nOver {args.init_seeds} initializations (ranked by the mean):\n\n```\n"
                        f"{result.over_seeds()}\n```\n")
    (out / "leaderboard.md").write_text(leaderboard)
    written.append(out / "leaderboard.md")
    print(f"\n{seconds:.0f} s; wrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
