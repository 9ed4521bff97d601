"""``moetrace import-csv | import-llamacpp | import-parquet | export-parquet``."""

from __future__ import annotations

import argparse
import sys

from engine.errors import MoetraceError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _common(parser: argparse.ArgumentParser, store_out: bool = True) -> None:
    if store_out:
        parser.add_argument("--n-experts", type=_positive, default=None,
                            help="number of experts (default: largest expert id + 1)")
        parser.add_argument("--chunk-rows", type=_positive, default=None, help="store rows per chunk (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("import-csv", help="import seed 000's samples.csv + topks.csv into a store",
                              description="Import samples.csv (one row per token) and topks.csv (one row per "
                                          "token x layer x top-k rank) into a new trace store.")
    p.add_argument("--samples", required=True, help="samples.csv: q_ix, token_ix, token, labels, per-question columns")
    p.add_argument("--topks", required=True, help="topks.csv: q_ix, token_ix, layer_ix, topk_ix, expert[, weight]")
    p.add_argument("out", metavar="OUT.zarr", help="store to create")
    p.add_argument("--labels", default=None,
                   help="comma-separated per-token label columns (default: domain, lang, language, subject "
                        "where present); other columns are per-question metadata")
    p.add_argument("--memory-budget", type=_positive, default=512, metavar="MIB",
                   help="working memory to stay under, in MiB (default 512)")
    p.add_argument("--max-row-mib", type=_positive, default=64, metavar="MIB",
                   help="longest CSV record accepted, in MiB (default 64; e.g. a long token text); "
                        "a longer one is an error naming its row")
    p.add_argument("--model", default=None, help="model name recorded in the store")
    _common(p)
    p.set_defaults(func=_run_import_csv)

    p = subparsers.add_parser("import-llamacpp", help="import llama.cpp expert traces (DIR/<domain>/traces/*.json)")
    p.add_argument("dir", metavar="DIR", help="directory with <domain>/traces/token-NNNNN.json files")
    p.add_argument("out", metavar="OUT.zarr", help="store to create")
    p.add_argument("--top-k", type=_positive, default=None,
                   help="experts per token, needed when the trace entries do not state it")
    p.add_argument("--model", default=None, help="model name recorded in the store")
    _common(p)
    p.set_defaults(func=_run_import_llamacpp)

    p = subparsers.add_parser("import-parquet", help="import a long-format Parquet file into a store")
    p.add_argument("input", metavar="IN.parquet", help="long format: seq, pos, token_id, layer, rank, expert, ...")
    p.add_argument("out", metavar="OUT.zarr", help="store to create")
    p.add_argument("--memory-budget", type=_positive, default=512, metavar="MIB",
                   help="working memory to stay under when the rows must be sorted, in MiB (default 512)")
    _common(p)
    p.set_defaults(func=_run_import_parquet)

    p = subparsers.add_parser("export-parquet", help="export a store as a long-format Parquet file")
    p.add_argument("store", metavar="STORE", help="trace store to read")
    p.add_argument("out", metavar="OUT.parquet", help="Parquet file to write")
    p.add_argument("--row-group-rows", type=_positive, default=1 << 20, help="rows per row group (default 1048576)")
    _common(p, store_out=False)
    p.set_defaults(func=_run_export_parquet)


def _report(store, out: str, quiet: bool) -> None:
    if not quiet:
        print(f"{out}: {len(store)} tokens, {store.n_layers} layers, {store.n_experts} experts, "
              f"top-{store.top_k}, labels {store.label_names}", file=sys.stderr)


def _run_import_csv(args) -> int:
    from engine.io import import_csv

    labels = None
    if args.labels is not None:
        labels = [name.strip() for name in args.labels.split(",") if name.strip()]
    store = import_csv(args.samples, args.topks, args.out, labels=labels, n_experts=args.n_experts,
                       model=args.model, chunk_rows=args.chunk_rows, memory_budget=args.memory_budget << 20,
                       max_row_bytes=args.max_row_mib << 20,
                       overwrite=args.overwrite, progress=not args.quiet)
    _report(store, args.out, args.quiet)
    return 0


def _run_import_llamacpp(args) -> int:
    from engine.io import import_llamacpp

    store = import_llamacpp(args.dir, args.out, top_k=args.top_k, n_experts=args.n_experts, model=args.model,
                            chunk_rows=args.chunk_rows, overwrite=args.overwrite, progress=not args.quiet)
    _report(store, args.out, args.quiet)
    return 0


def _run_import_parquet(args) -> int:
    from engine.io import import_parquet

    store = import_parquet(args.input, args.out, n_experts=args.n_experts, chunk_rows=args.chunk_rows,
                           memory_budget=args.memory_budget << 20, overwrite=args.overwrite, progress=not args.quiet)
    _report(store, args.out, args.quiet)
    return 0


def _run_export_parquet(args) -> int:
    from engine.io import export_parquet
    from engine.store import TraceStore

    try:
        store = TraceStore.open(args.store)
    except FileNotFoundError:
        raise MoetraceError(f"{args.store}: no such store") from None
    export_parquet(store, args.out, row_group_rows=args.row_group_rows, overwrite=args.overwrite,
                   progress=not args.quiet)
    if not args.quiet:
        print(f"{args.out}: {len(store) * store.n_layers * store.top_k} rows", file=sys.stderr)
    return 0
