"""``moetrace import-routed SRC OUT.zarr --format npy|vllm|sglang|megatron``."""

from __future__ import annotations

from moetrace.commands._help import add_command
from moetrace.commands._io_args import add_common, positive, report
from moetrace.io.routed import FORMATS


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 23


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "import-routed",
                    help="import per-request routing arrays from serving/training engines",
                    examples=["import-routed vllm_outputs.jsonl trace.zarr --format vllm --label-fields domain "
                              "--config config.json",
                              "import-routed routed_npy trace.zarr --format npy --labels labels.csv"],
                    description="Import routed expert ids [tokens, layers, top_k] per request (one "
                                          "sequence each) from " + ", ".join(FORMATS) + " outputs into a new store.")
    p.add_argument("src", metavar="SRC", help="source file or directory (see --format)")
    p.add_argument("out", metavar="OUT.zarr", help="store to create")
    p.add_argument("--format", required=True, choices=list(FORMATS), help="source format")
    p.add_argument("--top-k", type=positive, default=None,
                   help="experts per token (required by sglang, whose arrays are flat)")
    p.add_argument("--label-fields", default="",
                   help="comma-separated fields of each record to use as labels")
    p.add_argument("--labels", default=None, metavar="FILE",
                   help="CSV or JSONL side file: a request_id column and one column per label")
    p.add_argument("--model", default=None, help="model name recorded in the store")
    p.add_argument("--layer-ids", default=None, metavar="IDS",
                   help="the model's layer index of each MoE layer in the source, e.g. 1,2,3 (after dense, all-zero "
                        "layers are dropped); default: their index in the source")
    p.add_argument("--config", default=None, metavar="CONFIG.json",
                   help="the model's transformers config.json: its MoE layers (first_k_dense_replace, moe_layer_freq, "
                        "decoder_sparse_step, mlp_only_layers) give the layer ids, for sources indexed by MoE layer "
                        "(newer vLLM) or over every decoder layer (SGLang)")
    for name, (kind, text) in format_options().items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=positive if kind is int else kind, default=None,
                       help=text)
    add_common(p)
    p.set_defaults(func=_run)


def format_options() -> dict[str, tuple]:
    """Every format's own options (its module's ``OPTIONS``): name -> (type, help)."""
    from moetrace.io.routed import format_module

    out: dict[str, tuple] = {}
    for name in FORMATS:
        out.update(getattr(format_module(name), "OPTIONS", {}))
    return out


def _run(args) -> int:
    from moetrace.io.routed import import_routed

    from moetrace.errors import MoetraceError

    fields = [name.strip() for name in args.label_fields.split(",") if name.strip()]
    layer_ids = None
    if args.layer_ids is not None:
        try:
            layer_ids = [int(x) for x in args.layer_ids.split(",") if x.strip()]
        except ValueError:
            raise MoetraceError(f"--layer-ids: expected comma-separated integers, got {args.layer_ids!r}") from None
    store = import_routed(args.src, args.out, format=args.format, n_experts=args.n_experts, top_k=args.top_k,
                          label_fields=fields, labels_file=args.labels, model=args.model, layer_ids=layer_ids,
                          config=args.config, options={name: getattr(args, name) for name in format_options()
                                                       if getattr(args, name) is not None},
                          chunk_rows=args.chunk_rows, overwrite=args.overwrite, progress=not args.quiet)
    report(store, args.out, args.quiet)
    return 0
