"""Options and plumbing the seed-003 analysis commands share (each command is declared in its
analysis module, ``engine/analysis/<name>.py``): the common options, the output directory, one
line per file written, the store / counts / model token batches a command reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moetrace.errors import MoetraceError
from moetrace.models.loading import MODEL_HELP


def add_common(p, store: bool = True, layers_help: str = "layer ids (default: all MoE layers)",
            model: bool = False) -> None:
    if store:
        p.add_argument("store", nargs="?" if model else None,
                       help="trace store (.zarr)" + (" with routing/probs, or give --model" if model else ""))
    if model or not store:
        p.add_argument("--model", required=not store,
                       help=MODEL_HELP + (" (captured with probs into OUT/probs.zarr)" if store else ""))
        p.add_argument("--data", default=None, help="JSONL, one sequence per line ({\"text\"} or {\"input_ids\"}); "
                                                    "default with --model demo: the demo corpus")
        p.add_argument("--labels", default=None,
                       help="comma-separated label fields of each line for groups (default: none; demo: domain,lang)")
        p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="L", help=layers_help)
    p.add_argument("--num-tokens", type=int, default=None, metavar="N", help="use the first N tokens")
    p.add_argument("--out", default="analysis", help="output directory (default: ./analysis)")


def out_dir(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(out: Path, name: str, fig=None, table=None, dataset=None, data: Any = None) -> list[Path]:
    """:func:`moetrace.analysis._common.write_outputs`, saying on stdout what was written."""
    from moetrace.analysis._common import write_outputs

    written = write_outputs(out, name, fig, table, dataset, data)
    print(f"wrote {', '.join(str(w) for w in written)}")
    return written


def label_list(arg: str | None, store) -> list[str]:
    return store.label_names if arg is None else [x for x in arg.split(",") if x]


def select_layers(ds, layers):
    if layers is None:
        return ds
    have = ds["layer"].values.tolist()
    missing = [l for l in layers if l not in have]
    if missing:
        raise MoetraceError(f"--layers: {missing} not recorded (have {have})")
    return ds.sel(layer=list(layers))


def open_store(args):
    from moetrace.store import TraceStore

    if not Path(args.store).exists():
        raise MoetraceError(f"{args.store}: no such trace store")
    return TraceStore.open(args.store)


def count_store(args, stats):
    from moetrace.counting import count_range
    from moetrace.analysis._common import row_range

    st = open_store(args)
    start, stop = row_range(st, args.num_tokens)
    return st, count_range(st, start, stop, stats=stats, by=label_list(args.by, st), progress=False)


def batches(args, model, tokenizer):
    """Token batches of --data (or the demo corpus) until --num-tokens."""
    from moetrace.analysis._common import token_batches

    if args.data is None:
        if args.model != "demo":
            raise MoetraceError("--data: required unless --model demo")
        from moetrace.demo.data import make_training_documents

        want = args.num_tokens or 20_000
        rows = make_training_documents(max(8, want // 20), seed=1)  # ~25 tokens each; extended below
        labels = ["domain", "lang"] if args.labels is None else [x for x in args.labels.split(",") if x]
    else:
        from moetrace.commands.capture import read_jsonl

        labels = [x for x in (args.labels or "").split(",") if x]
        rows = read_jsonl(Path(args.data), labels)
    if any("input_ids" not in r for r in rows) and tokenizer is None:
        raise MoetraceError(f"--model {args.model}: lines have 'text' but the model has no tokenizer")
    ids = [r["input_ids"] if "input_ids" in r else tokenizer(r["text"])["input_ids"] for r in rows]
    groups = ["/".join(str(r[l]) for l in labels) if labels else "all" for r in rows]
    if args.data is None and args.num_tokens:
        total = sum(len(x) for x in ids)
        if total < args.num_tokens:  # more demo documents from further seeds
            from moetrace.demo.data import make_training_documents

            seed = 2
            while total < args.num_tokens:
                more = make_training_documents(max(8, (args.num_tokens - total) // 20), seed=seed)
                ids += [tokenizer(r["text"])["input_ids"] for r in more]
                groups += [f"{r['domain']}/{r['lang']}" for r in more]
                total = sum(len(x) for x in ids)
                seed += 1
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (model.config.pad_token_id or 0)
    return lambda: token_batches(ids, batch_size=args.batch_size, num_tokens=args.num_tokens, pad_id=pad,
                                 groups=groups)
