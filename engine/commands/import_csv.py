"""``moetrace import-csv``."""

from __future__ import annotations

from moetrace.commands._help import add_command
from moetrace.commands._io_args import add_common, positive, report


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 20


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "import-csv", help="import seed 000's samples.csv + topks.csv into a store",
                    examples=["import-csv --samples samples.csv --topks topks.csv trace.zarr",
                              "import-csv --samples samples.csv --topks topks.csv trace.zarr --labels domain,lang "
                              "--memory-budget 2048"],
                    description="Import samples.csv (one row per token) and topks.csv (one row per "
                                          "token x layer x top-k rank) into a new trace store.")
    p.add_argument("--samples", required=True, help="samples.csv: q_ix, token_ix, token, labels, per-question columns")
    p.add_argument("--topks", required=True, help="topks.csv: q_ix, token_ix, layer_ix, topk_ix, expert[, weight]; "
                                                    "topk_ix is 1-based (1 = the top-1 expert), as seed 000 writes it")
    p.add_argument("out", metavar="OUT.zarr", help="store to create")
    p.add_argument("--labels", default=None,
                   help="comma-separated per-token label columns (default: domain, lang, language, subject "
                        "where present); other columns are per-question metadata")
    p.add_argument("--memory-budget", type=positive, default=512, metavar="MIB",
                   help="working memory to stay under, in MiB (default 512)")
    p.add_argument("--max-row-mib", type=positive, default=64, metavar="MIB",
                   help="longest CSV record accepted, in MiB (default 64; e.g. a long token text); "
                        "a longer one is an error naming its row")
    p.add_argument("--model", default=None, help="model name recorded in the store")
    add_common(p)
    p.set_defaults(func=_run_import_csv)


def _run_import_csv(args) -> int:
    from moetrace.io import import_csv

    labels = None
    if args.labels is not None:
        labels = [name.strip() for name in args.labels.split(",") if name.strip()]
    store = import_csv(args.samples, args.topks, args.out, labels=labels, n_experts=args.n_experts,
                       model=args.model, chunk_rows=args.chunk_rows, memory_budget=args.memory_budget << 20,
                       max_row_bytes=args.max_row_mib << 20,
                       overwrite=args.overwrite, progress=not args.quiet)
    report(store, args.out, args.quiet)
    return 0
