"""``moetrace capture --model PATH --data FILE.jsonl OUT.zarr``: record a model's routing."""

from __future__ import annotations

from pathlib import Path

from moetrace.commands._help import add_command
from moetrace.errors import MoetraceError
from moetrace.jsonl import read_json_objects
from moetrace.models.loading import MODEL_HELP


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 10


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers, "capture", help="run a transformers MoE model over a JSONL file and record its routing",
        examples=["capture trace.zarr --model demo --data texts.jsonl --labels domain,lang",
                  "capture trace.zarr --model allenai/OLMoE-1B-7B-0924 --data prompts.jsonl --labels domain "
                  "--max-new-tokens 32 --probs"],
        description="Each JSONL line is one sequence: {\"text\": ...} (tokenized with the model's "
                    "tokenizer) or {\"input_ids\": [...]}, plus label fields named by --labels. "
                    "The sequence id is the line number (0-based; with --append, counted on from the "
                    "store's largest id).")
    p.add_argument("out", help="trace store to create (.zarr directory)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    existing.add_argument("--append", action="store_true",
                          help="add to OUT if it exists, with sequence ids after its largest one")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="JSONL file, one sequence per line")
    p.add_argument("--labels", default="", help="comma-separated label fields of each line, e.g. domain,lang")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="also generate N tokens per sequence (greedy) and record the first N-1 of them "
                        "(the last generated token never goes through the model, so it has no routing)")
    p.add_argument("--probs", action="store_true", help="also record the full router distribution")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def read_jsonl(path: Path, labels: list[str]) -> list[dict]:
    """Lines of ``path`` as dicts, each with ``text`` or ``input_ids`` and every label field."""
    rows = []
    for line_no, row in read_json_objects(path):
        if "text" not in row and "input_ids" not in row:
            raise MoetraceError(f"{path}: line {line_no}: expected an object with 'text' or 'input_ids'")
        for label in labels:
            if label not in row:
                raise MoetraceError(f"{path}: line {line_no}: missing label field {label!r}")
        rows.append(row)
    if not rows:
        raise MoetraceError(f"{path}: no sequences (empty file)")
    return rows


def run(args) -> int:
    from moetrace.capture import next_sequence_id
    from moetrace.io import staged_store
    from moetrace.models.loading import load_model
    from moetrace.store import TraceStore

    labels = [x for x in args.labels.split(",") if x]
    out = Path(args.out)
    if out.exists() and not (args.overwrite or args.append):
        raise MoetraceError(f"{out}: output already exists (pass --overwrite to replace it, or --append to add "
                            f"sequences after its largest id)")
    rows = read_jsonl(Path(args.data), labels)
    if args.batch_size < 1:
        raise MoetraceError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    needs_tokenizer = any("input_ids" not in r for r in rows)  # a line with 'text' is tokenized
    # the tokenizer is loaded even for input_ids lines: the store records it, so later commands show token text
    model, tokenizer = load_model(args.model, require_tokenizer=needs_tokenizer)
    if args.append and out.exists():
        first_id = next_sequence_id(TraceStore.open(out))
        cap = _capture_rows(model, tokenizer, out, rows, labels, first_id, args)
    else:  # a new store, published only once complete (replacing OUT with --overwrite)
        first_id = 0
        with staged_store(out, overwrite=args.overwrite) as partial:
            cap = _capture_rows(model, tokenizer, partial, rows, labels, first_id, args)
    print(f"captured {cap.rows_captured:,} tokens from {len(rows):,} sequences (ids {first_id}.."
          f"{first_id + len(rows) - 1}) into {args.out}")
    return 0


def _capture_rows(model, tokenizer, out: Path, rows: list[dict], labels: list[str], first_id: int, args):
    """Capture every line of ``rows`` into the store at ``out``, line i as sequence ``first_id + i``."""
    from moetrace.capture import capture_texts

    return capture_texts(model, tokenizer, rows, out, labels, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, probs=args.probs, first_id=first_id,
                         progress=not args.quiet)
