"""``moetrace capture --model PATH --data FILE.jsonl OUT.zarr``: record a model's routing."""

from __future__ import annotations

import json
from pathlib import Path

from moetrace.errors import MoetraceError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "capture", help="run a transformers MoE model over a JSONL file and record its routing",
        description="Each JSONL line is one sequence: {\"text\": ...} (tokenized with the model's "
                    "tokenizer) or {\"input_ids\": [...]}, plus label fields named by --labels. "
                    "The sequence id is the line number (0-based; with --append, counted on from the "
                    "store's largest id).")
    p.add_argument("out", help="trace store to create (.zarr directory)")
    existing = p.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    existing.add_argument("--append", action="store_true",
                          help="add to OUT if it exists, with sequence ids after its largest one")
    p.add_argument("--model", required=True, help="local transformers checkpoint directory (or a hub name where "
                                                  "the network allows)")
    p.add_argument("--data", required=True, help="JSONL file, one sequence per line")
    p.add_argument("--labels", default="", help="comma-separated label fields of each line, e.g. domain,lang")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=0,
                   help="also generate N tokens per sequence (greedy) and record the first N-1 of them "
                        "(the last generated token never goes through the model, so it has no routing)")
    p.add_argument("--probs", action="store_true", help="also record the full router distribution")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def read_jsonl(path: Path, labels: list[str]) -> list[dict]:
    """Lines of ``path`` as dicts, each with ``text`` or ``input_ids`` and every label field."""
    if not path.is_file():
        raise MoetraceError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise MoetraceError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or ("text" not in row and "input_ids" not in row):
                raise MoetraceError(f"{path}:{line_no}: expected an object with 'text' or 'input_ids'")
            for label in labels:
                if label not in row:
                    raise MoetraceError(f"{path}:{line_no}: missing label field {label!r}")
            rows.append(row)
    if not rows:
        raise MoetraceError(f"{path}: no sequences (empty file)")
    return rows


def run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moetrace.capture import next_sequence_id
    from moetrace.io import staged_store
    from moetrace.store import TraceStore

    labels = [x for x in args.labels.split(",") if x]
    out = Path(args.out)
    if out.exists() and not (args.overwrite or args.append):
        raise MoetraceError(f"{out}: output already exists (pass --overwrite to replace it, or --append to add "
                            f"sequences after its largest id)")
    rows = read_jsonl(Path(args.data), labels)
    if args.batch_size < 1:
        raise MoetraceError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    except OSError as exc:
        raise MoetraceError(f"--model {args.model}: cannot load a transformers checkpoint ({exc})") from None
    tokenizer = None
    if any("input_ids" not in r for r in rows):
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as exc:
            raise MoetraceError(f"--model {args.model}: lines have 'text' but no tokenizer loads ({exc})") from None
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def encode(row: dict) -> list[int]:
        if "input_ids" in row:
            return [int(x) for x in row["input_ids"]]
        return tokenizer(row["text"], add_special_tokens=True)["input_ids"]

    if args.append and out.exists():
        first_id = next_sequence_id(TraceStore.open(out))
        cap = _capture_rows(model, out, rows, labels, encode, pad_id, first_id, args)
    else:  # a new store, published only once complete (replacing OUT with --overwrite)
        first_id = 0
        with staged_store(out, overwrite=args.overwrite) as partial:
            cap = _capture_rows(model, partial, rows, labels, encode, pad_id, first_id, args)
    print(f"captured {cap.rows_captured:,} tokens from {len(rows):,} sequences (ids {first_id}.."
          f"{first_id + len(rows) - 1}) into {args.out}")
    return 0


def _capture_rows(model, out: Path, rows: list[dict], labels: list[str], encode, pad_id: int, first_id: int, args):
    """Capture every line of ``rows`` into the store at ``out``, line i as sequence ``first_id + i``."""
    import torch
    from moetrace.progress import tqdm

    from moetrace.capture import capture

    with capture(model, out, labels=labels, probs=args.probs) as cap, torch.no_grad():
        for start in tqdm(range(0, len(rows), args.batch_size), disable=args.quiet, desc="capture", unit="batch"):
            batch = rows[start:start + args.batch_size]
            ids = [encode(r) for r in batch]
            width = max(len(x) for x in ids)
            # Left padding, so generation continues every row from its last real token.
            input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            cap.set_batch(seq=list(range(first_id + start, first_id + start + len(batch))),
                          labels={label: [str(r[label]) for r in batch] for label in labels})
            if args.max_new_tokens > 0:
                model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                               do_sample=False, pad_token_id=pad_id)
            else:
                model(input_ids=input_ids, attention_mask=mask)
    return cap
