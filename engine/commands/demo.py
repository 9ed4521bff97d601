"""``moetrace demo [--out DIR]``: the built-in end-to-end run."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the built-in end-to-end demo into DIR (default demo_out)")
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.demo.trace import run_trace_demo

    summary = run_trace_demo(args.out, progress=not args.quiet)
    print(f"demo finished in {summary['seconds']} s; outputs in {args.out}/")
    return 0
