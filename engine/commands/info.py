"""``moetrace info STORE [--json]``: what a trace store holds."""

from __future__ import annotations

import json

from moetrace.commands._help import add_command


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 30


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "info", help="rows, sequences, layers, experts, labels and array sizes of a store",
                    examples=["info trace.zarr", "info trace.zarr --json"])
    p.add_argument("store", help="path of a moetrace trace store (.zarr directory)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(args) -> int:
    from moetrace.intervene import describe_intervention
    from moetrace.store import TraceStore

    info = TraceStore.open(args.store).info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"store       {info['path']} (format_version {info['format_version']})")
    print(f"model       {info['model'] or '-'} (scoring: {info['scoring'] or '-'})")
    print(f"tokenizer   {info.get('tokenizer') or '- (token ids only)'}")
    print(f"rows        {info['rows']:,} tokens, {info['routing_rows']:,} routing rows")
    meta = info["sequence_metadata_rows"]
    print(f"sequences   {info['sequences']:,} " + (f"(per-sequence metadata for {meta:,})" if meta
                                                  else "(no per-sequence metadata)"))
    for entry in info.get("interventions", []):
        ranges = ", ".join(f"{lo}" if lo == hi else f"{lo}..{hi}" for lo, hi in entry["sequences"])
        print(f"intervened  sequences {ranges}: " + "; then ".join(describe_intervention(w) for w in entry["what"]))
    if info["sequence_runs"] != info["sequences"]:
        print(f"warning     the rows of a sequence are not contiguous ({info['sequence_runs']:,} runs of equal seq): "
              "statistics that pair adjacent rows (temporal, stickiness) are wrong on this store; re-import it")
    print(f"layers      {info['n_layers']} {info['layer_ids']}")
    order = "rank order (rank 0 = top-1)" if info["rank_order"] == "ranked" else \
        "rank order unknown (each token's set of experts only: no top-1 statistics)"
    print(f"experts     {info['n_experts']}, top-{info['top_k']}, {order}")
    for label, counts in info["labels"].items():
        values = ", ".join(f"{k}={v:,}" for k, v in counts.items())
        print(f"label       {label}: {values}")
    print(f"{'array':<24} {'shape':<22} {'dtype':<10} {'raw':>10} {'stored':>10} {'ratio':>6}  codec")
    for name, a in info["arrays"].items():
        raw, stored = a["raw_bytes"], a["stored_bytes"]
        # under 1 MiB a chunk's fixed overhead dominates: a ratio would say nothing about the codec
        ratio = f"{raw / stored:.1f}x" if raw and stored and raw >= 1 << 20 else "small" if raw else "-"
        print(f"{name:<24} {str(tuple(a['shape'])):<22} {a['dtype']:<10} {_size(raw):>10} {_size(stored):>10} "
              f"{ratio:>6}  {a['codec']}")
    return 0
