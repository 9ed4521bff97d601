"""``moetrace experiment --model PATH --data FILE OUT_DIR``: the ablation experiment."""

from __future__ import annotations

import json
from pathlib import Path

from moetrace.commands._help import add_command
from moetrace.models.loading import MODEL_HELP


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 70


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers, "experiment",
        examples=["experiment run --model demo --data questions.csv --select select_texts.jsonl --texts texts.jsonl",
                  "experiment run --model ./my-moe --data mmlu.csv --select held_out.jsonl --methods experts,paths "
                  "--threshold experts=2 --doses 1,2,4,all"],
        help="evaluate, capture, find each group's specialized routes, ablate them, compare",
        description="Base multiple-choice evaluation (answer scoring by default) with chance and answer-blind "
                    "baselines -> routing of held-out texts (--select) captured and counted -> for every group "
                    "and method the specialized targets -> evaluation of every group under each ablation, plus "
                    "coverage-matched random draws on the targeted group -> targeted-vs-random tests over draws "
                    "(Holm over the primary tests). Writes OUT_DIR/results.csv, items.csv, base.csv, "
                    "summary.json, trace.zarr, counts.zarr, targets/.")
    p.add_argument("out", help="output directory")
    p.add_argument("--model", required=True, help=MODEL_HELP + " (with its tokenizer)")
    p.add_argument("--data", required=True, help="questions in MMLU format (CSV or JSONL: question,A,B,C,D,answer,"
                                                 "domain,lang)")
    p.add_argument("--texts", default=None, help="optional JSONL of {text, domain, lang[, answer_spans]} for per-group "
                                                  "loss (answer_spans: [start, end) character offsets of the answers, "
                                                  "to report their loss apart)")
    p.add_argument("--select", default=None,
                   help="JSONL of held-out {text, domain, lang} (none equal to an evaluated item) whose routing "
                        "selects the targets; without it the evaluated questions' contexts are used, with a warning")
    p.add_argument("--scoring", choices=("answer", "letter"), default="answer",
                   help="answer: each option's answer text scored by its summed log-likelihood after the question "
                        "(or the question's context column); letter: the logit of the answer letter (default answer)")
    p.add_argument("--by", default="domain", help="labels that define a group (default: domain)")
    p.add_argument("--labels", default="domain,lang", help="label columns captured into the trace")
    p.add_argument("--methods", default="paths,experts,pairs",
                   help="comma-separated target methods: paths (top-1 layer-to-layer), experts (top-1 expert per "
                        "layer), pairs (ordered top-2) (default: all three)")
    p.add_argument("--threshold", action="append", default=[], metavar="METHOD=X",
                   help="selection threshold of a method (repeatable), e.g. experts=2: an item is a group's target "
                        "when its share of samples from the group >= the group's share x X (seed 000's defaults: "
                        "paths 1, experts 5, pairs 5; with G equal groups, X > G selects nothing)")
    p.add_argument("--random", type=int, default=20,
                   help="random draws per target, matched on the targeted group's traffic; the p-value of "
                        "targeted vs random is a rank among them, so it cannot go below 1/(N+1) per group (default 20)")
    p.add_argument("--band", type=float, default=None,
                   help="a draw matches when its coverage of the targeted group's routes is within this factor of "
                        "the targets' (default moetrace.experiment.COVERAGE_BAND, 1.25)")
    p.add_argument("--doses", default=None,
                   help="dose-response: ablate the n most specialized items for each n, e.g. 1,2,4,8,all, "
                        "beside up to 5 random draws matched to their coverage; writes OUT_DIR/dose_response.csv")
    p.add_argument("--modes", default="reroute",
                   help="mask modes for the dose-response: reroute, zero or reroute,zero (default reroute)")
    p.add_argument("--batch-size", type=int, default=32, help="questions or texts per forward pass (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws and the bootstrap (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _thresholds(items: list[str]) -> dict[str, float]:
    """``["experts=2", ...]`` -> ``{"experts": 2.0}``; MoetraceError naming a malformed item."""
    from moetrace.errors import MoetraceError
    from moetrace.experiment import METHODS

    out = {}
    for item in items:
        method, _, value = item.partition("=")
        try:
            x = float(value)
        except ValueError:
            x = float("nan")
        if method not in METHODS or not x > 0:
            raise MoetraceError(f"--threshold: expected METHOD=X with METHOD one of {', '.join(METHODS)} and X > 0, "
                                f"got {item!r}")
        out[method] = x
    return out


def run(args) -> int:
    from moetrace.evaluate import load_questions, load_texts
    from moetrace.demo.run import base_lines
    from moetrace.experiment import COVERAGE_BAND, run_experiment
    from moetrace.results import summary_lines

    from moetrace.models.loading import load_model

    model, tokenizer = load_model(args.model, require_tokenizer=True)
    questions = load_questions(args.data)
    texts = load_texts(args.texts) if args.texts else None
    select = load_texts(args.select) if args.select else None
    run_experiment(model, tokenizer, questions, args.out, texts=texts, select_texts=select, scoring=args.scoring,
                   band=COVERAGE_BAND if args.band is None else args.band,
                   methods=[m for m in args.methods.split(",") if m],
                   by=[b for b in args.by.split(",") if b], labels=[x for x in args.labels.split(",") if x],
                   thresholds=_thresholds(args.threshold), n_random=args.random, seed=args.seed,
                   batch_size=args.batch_size,
                   doses=args.doses, modes=[m for m in args.modes.split(",") if m],
                   progress=not args.quiet)

    summary = json.loads((Path(args.out) / "summary.json").read_text())
    print("\n".join(base_lines(summary["base"])))
    print("\n".join(summary_lines(summary)))
    print(f"wrote {args.out}/results.csv, items.csv (per-item outcomes), base.csv and summary.json (with 95% "
          "intervals and the primary tests)")
    return 0
