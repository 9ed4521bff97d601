"""``moetrace import-llamacpp``."""

from __future__ import annotations

from moetrace.commands._help import add_command
from moetrace.commands._io_args import add_common, positive, report


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 21


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "import-llamacpp", help="import llama.cpp expert traces (DIR/<domain>/traces/*.json)",
                    examples=["import-llamacpp llamacpp_traces trace.zarr",
                              "import-llamacpp llamacpp_traces trace.zarr --top-k 8"])
    p.add_argument("dir", metavar="DIR", help="directory with <domain>/traces/token-NNNNN.json files")
    p.add_argument("out", metavar="OUT.zarr", help="store to create")
    p.add_argument("--top-k", type=positive, default=None,
                   help="experts per token, needed when the trace entries do not state it")
    p.add_argument("--model", default=None, help="model name recorded in the store")
    add_common(p)
    p.set_defaults(func=_run_import_llamacpp)


def _run_import_llamacpp(args) -> int:
    from moetrace.io import import_llamacpp

    store = import_llamacpp(args.dir, args.out, top_k=args.top_k, n_experts=args.n_experts, model=args.model,
                            chunk_rows=args.chunk_rows, overwrite=args.overwrite, progress=not args.quiet)
    report(store, args.out, args.quiet)
    return 0
