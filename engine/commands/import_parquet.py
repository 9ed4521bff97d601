"""``moetrace import-parquet``."""

from __future__ import annotations

from moetrace.commands._help import add_command
from moetrace.commands._io_args import add_common, positive, report


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 22


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "import-parquet", help="import a long-format Parquet file into a store",
                    examples=["import-parquet routing.parquet trace.zarr",
                              "import-parquet routing.parquet trace.zarr --memory-budget 4096 --overwrite"])
    p.add_argument("input", metavar="IN.parquet", help="long format: seq, pos, token_id, layer, rank, expert, ...")
    p.add_argument("out", metavar="OUT.zarr", help="store to create")
    p.add_argument("--memory-budget", type=positive, default=512, metavar="MIB",
                   help="working memory to stay under when the rows must be sorted, in MiB (default 512)")
    add_common(p)
    p.set_defaults(func=_run_import_parquet)


def _run_import_parquet(args) -> int:
    from moetrace.io import import_parquet

    store = import_parquet(args.input, args.out, n_experts=args.n_experts, chunk_rows=args.chunk_rows,
                           memory_budget=args.memory_budget << 20, overwrite=args.overwrite, progress=not args.quiet)
    report(store, args.out, args.quiet)
    return 0
