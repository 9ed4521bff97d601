"""``moetrace compare A.zarr B.zarr``: routing agreement of two traces of the same tokens."""

from __future__ import annotations

from moetrace.commands._help import add_command


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 80


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers, "compare",
        examples=["compare trace_hf.zarr trace_vllm.zarr",
                  "compare run/trace.zarr replayed.zarr --by domain --out run"],
        help="agreement of two traces' routing on the same tokens (top-1, top-k overlap, Jaccard)",
        description="Aligns the tokens of two trace stores by (seq, pos) (their token ids must agree) and "
                    "reports per layer (and per group with --by) top-1 agreement, top-k overlap |A n B| / k, "
                    "Jaccard and, when both have weights, the rank correlation of the weights; plus the "
                    "tokens whose top-1 differs in most layers.")
    p.add_argument("a", help="first trace store (.zarr); groups come from its labels")
    p.add_argument("b", help="second trace store (.zarr)")
    p.add_argument("--by", default="", help="labels of A to group by, e.g. domain,lang")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--out", default=None, help="directory for compare.json and compare.png (created); "
                                               "an experiment's run directory gets a report section from them")
    p.add_argument("--top", type=int, default=10, help="tokens listed as disagreeing most (default 10)")
    p.set_defaults(func=run)


def _table(layers: list[dict], measures: list[str]) -> None:
    print(f"{'layer':>6} " + " ".join(f"{m:>17}" for m in measures))
    for entry in layers:
        print(f"{entry['layer']:>6} " + " ".join(f"{'n/a':>17}" if entry.get(m) is None else f"{entry[m]:>17.4f}"
                                                 for m in measures))


def run(args) -> int:
    import json
    from pathlib import Path

    from moetrace import figures
    from moetrace.compare import MEASURES, compare, summary_json
    from moetrace.errors import MoetraceError

    if args.top < 0:
        raise MoetraceError(f"--top: expected a number >= 0, got {args.top}")
    result = compare(args.a, args.b, by=[x for x in args.by.split(",") if x], top_tokens=args.top)
    summary = summary_json(result)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps(summary, indent=1))
        figures.compare_agreement(summary).savefig(out / "compare.png", dpi=120)
    if args.json:
        print(json.dumps(summary))
        return 0
    unmatched = summary.get("unmatched_tokens", {})
    print(f"{summary['tokens']:,} aligned tokens in {summary['sequences']:,} sequences: {summary['a']} vs {summary['b']}")
    for side, other in (("a", "b"), ("b", "a")):
        if unmatched.get(side):
            print(f"  {unmatched[side]:,} tokens of {summary[side]} have no match (same seq and pos) in "
                  f"{summary[other]} and are not compared")
    measures = [m for m in MEASURES if m in summary["layers"][0]]
    print("\nall tokens:")
    _table(summary["layers"], measures)
    for group in summary.get("groups", []):
        name = "/".join(str(v) for k, v in group.items() if k not in ("tokens", "layers"))
        print(f"\ngroup {name} ({group['tokens']:,} tokens):")
        _table(group["layers"], measures)
    if summary["rank_order_unknown"]:
        print(f"top-1 agreement: not measured, the rank order of {' and '.join(summary['rank_order_unknown'])} is "
              "unknown (only the set of each token's experts was recorded)")
    if summary["worst_tokens"]:
        print(f"\ntokens whose {summary['differing']} differs in most layers (seq, pos, token_id, layers):")
        for row in summary["worst_tokens"]:
            print(f"  {row['seq']:>8} {row['pos']:>6} {row['token_id']:>8} {row['layers_differing']:>4}")
    else:
        print(f"\nno aligned token's {summary['differing']} differs in any layer")
    if args.out:
        print(f"wrote {Path(args.out) / 'compare.json'} and compare.png")
    return 0
