"""``moetrace experiment --model PATH --data FILE OUT_DIR``: the ablation experiment."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment", help="evaluate, capture, find each group's specialized routes, ablate them, compare",
        description="Base multiple-choice evaluation with capture -> counts -> for every group and method "
                    "the specialized targets -> evaluation of every group under each ablation, plus random "
                    "controls. Writes OUT_DIR/results.csv, summary.json, trace.zarr, counts.zarr, targets/.")
    p.add_argument("out", help="output directory")
    p.add_argument("--model", required=True, help="local transformers checkpoint directory (with its tokenizer)")
    p.add_argument("--data", required=True, help="questions in MMLU format (CSV or JSONL: question,A,B,C,D,answer,"
                                                 "domain,lang)")
    p.add_argument("--texts", default=None, help="optional JSONL/CSV of {text, domain, lang} for per-group loss")
    p.add_argument("--by", default="domain", help="labels that define a group (default: domain)")
    p.add_argument("--labels", default="domain,lang", help="label columns captured into the trace")
    p.add_argument("--methods", default="paths,experts,pairs")
    p.add_argument("--random", type=int, default=3, help="random-control seeds per target (default 3)")
    p.add_argument("--doses", default=None,
                   help="dose-response: ablate the n most specialized items for each n, e.g. 1,2,4,8,all "
                        "(and n random real routes as control); writes OUT_DIR/dose_response.csv")
    p.add_argument("--modes", default="reroute",
                   help="mask modes for the dose-response: reroute, zero or reroute,zero (default reroute)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.errors import MoetraceError
    from engine.evaluate import load_questions, load_texts
    from engine.experiment import run_experiment, summary_lines

    try:
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        raise MoetraceError(f"--model {args.model}: cannot load a transformers checkpoint and tokenizer ({exc})") from None
    questions = load_questions(args.data)
    texts = load_texts(args.texts) if args.texts else None
    run_experiment(model, tokenizer, questions, args.out, texts=texts,
                           methods=[m for m in args.methods.split(",") if m],
                           by=[b for b in args.by.split(",") if b], labels=[x for x in args.labels.split(",") if x],
                           n_random=args.random, seed=args.seed, batch_size=args.batch_size,
                           doses=args.doses, modes=[m for m in args.modes.split(",") if m],
                           progress=not args.quiet)
    summary = json.loads((Path(args.out) / "summary.json").read_text())
    summary.pop("base_accuracy", None)
    print("\n".join(summary_lines(summary)))
    print(f"wrote {args.out}/results.csv, items.csv (per-item outcomes) and summary.json (with 95% intervals)")
    return 0
