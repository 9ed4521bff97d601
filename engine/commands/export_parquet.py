"""``moetrace export-parquet``."""

from __future__ import annotations

import sys

from moetrace.commands._help import add_command
from moetrace.commands._io_args import add_common, positive
from moetrace.errors import MoetraceError


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 110


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "export-parquet", help="export a store as a long-format Parquet file",
                    examples=["export-parquet trace.zarr trace.parquet"])
    p.add_argument("store", metavar="STORE", help="trace store to read")
    p.add_argument("out", metavar="OUT.parquet", help="Parquet file to write")
    p.add_argument("--row-group-rows", type=positive, default=1 << 20, help="rows per row group (default 1048576)")
    add_common(p, store_out=False)
    p.set_defaults(func=_run_export_parquet)


def _run_export_parquet(args) -> int:
    from moetrace.io import export_parquet
    from moetrace.store import TraceStore

    try:
        store = TraceStore.open(args.store)
    except FileNotFoundError:
        raise MoetraceError(f"{args.store}: no such store") from None
    export_parquet(store, args.out, row_group_rows=args.row_group_rows, overwrite=args.overwrite,
                   progress=not args.quiet)
    if not args.quiet:
        print(f"{args.out}: {len(store) * store.n_layers * store.top_k} rows", file=sys.stderr)
    return 0
