"""``moetrace demo [--out DIR]``: the built-in end-to-end run (see engine/demo/run.py)."""

from __future__ import annotations

from moetrace.commands._help import add_command


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 0


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "demo", help="load the shipped demo MoE model, run the ablation experiment, "
                                             "write DIR/report.html and DIR/results.csv",
                    examples=["demo", "demo --out demo_out --random 50"])
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--random", type=int, default=None,
                   help="matched random draws per target (default: moetrace.demo.run.DEMO_RANDOM, 20)")
    p.add_argument("--retrain", action="store_true",
                   help="train the demo model again (about 5 min on one core) instead of loading the shipped "
                        "weights, and report whether the new weights' SHA-256 matches the shipped one")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from moetrace.demo.run import DEMO_RANDOM, run_demo

    run_demo(args.out, n_random=DEMO_RANDOM if args.random is None else args.random, retrain=args.retrain,
             progress=not args.quiet)
    return 0
