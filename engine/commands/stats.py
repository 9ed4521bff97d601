"""``moetrace stats COUNTS.zarr``: seed 002's tables from a counts file (see engine/stats_tables.py)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("stats", help="chi-square, entropy, stickiness and specialist tables of a counts file")
    p.add_argument("counts", help="counts written by `moetrace count` (.zarr)")
    p.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.add_argument("--layer", type=int, default=None,
                   help="layer id for the specialist/generalist table (default: the largest chi-square)")
    p.add_argument("--rank", type=int, default=None,
                   help="use only this top-k rank (default: all ranks summed, as seed 002)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moetrace.stats_tables import print_stats

    return print_stats(args)
