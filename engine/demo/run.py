"""``moetrace demo``: the whole engine on the built-in model, from a fresh clone.

1. build (first run, cached afterwards) or load the demo model: a small OLMoE trained on the
   demo's synthetic domains (``engine.demo.model``), loaded with ``from_pretrained`` like any
   local checkpoint;
2. run the ablation experiment (``engine.experiment.run_experiment``) on its held-out
   multiple-choice questions and texts: base evaluation with capture, counts, each domain's
   specialized paths / experts / pairs, every domain evaluated under each ablation, and random
   controls; writes ``results.csv``, ``summary.json``, ``trace.zarr``, ``counts.zarr``,
   ``targets/``;
3. run the seed-003 analyses on the demo model (``engine.analysis.suite.run_suite``: router
   decisiveness, router statistics, expert similarity, a 2-D map, a profile and a steering
   example) into ``analysis/``, then write ``report.html`` (``engine.report.write_report``);
4. run the trace walk-through of seed 000's CSV workflow into ``csv_demo/``
   (``engine.demo.trace.run_trace_demo``: import, count, targets, coverage, Parquet);
5. print where the report is and the summary table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from engine.demo.model import QUESTIONS_FILE, TEXTS_FILE, ensure_demo_model, load_demo_model


# Seed 000's thresholds (1 / 5 / 5) assume many groups (its domain x language cells): an item is
# kept when its share from the group is >= threshold x the group's share. With the demo's four
# domains (share about 0.25) a threshold of 5 can never be met, so every method uses 2 here: an
# item is specialized when at least half of its uses come from one domain.
DEMO_THRESHOLDS = {"paths": 2.0, "experts": 2.0, "pairs": 2.0}


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:+.3f}"


def run_demo(out: str | Path = "demo_out", *, n_random: int = 3, progress: bool = True) -> dict:
    """Run the demo into ``out``; returns the experiment summary (also in ``out/summary.json``)."""
    from engine.demo.trace import run_trace_demo
    from engine.evaluate import load_questions, load_texts
    from engine.experiment import run_experiment, summarize
    from engine.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = ensure_demo_model(progress=progress)
    model, tokenizer = load_demo_model(model_dir)
    print(f"[1/4] demo model: {model_dir} ({type(model).__name__}, "
          f"{model.config.num_hidden_layers} layers, {model.config.num_experts} experts, "
          f"top-{model.config.num_experts_per_tok})")

    questions = load_questions(model_dir / QUESTIONS_FILE)
    texts = load_texts(model_dir / TEXTS_FILE)
    table = run_experiment(model, tokenizer, questions, out, texts=texts, by=("domain",),
                           thresholds=DEMO_THRESHOLDS, n_random=n_random, progress=progress)
    summary = summarize(table)
    print(f"[2/4] experiment on {len(questions)} questions and {len(texts)} texts -> {out / 'results.csv'}")

    from engine.analysis.suite import run_suite
    from engine.demo.data import make_training_documents

    docs = make_training_documents(200, seed=1)
    run_suite(model, [tokenizer(d["text"])["input_ids"] for d in docs], [f"{d['domain']}/{d['lang']}" for d in docs],
              out / "analysis", num_tokens=2000, pad_id=tokenizer.pad_token_id or 0, decode=tokenizer.decode)
    report = write_report(out, out / "report.html", title="moetrace demo")
    print(f"[3/4] report -> {report}")
    run_trace_demo(out / "csv_demo", progress=False, verbose=False)
    print(f"[4/4] seed 000 CSV walk-through -> {out / 'csv_demo'}")

    base = json.loads((out / "summary.json").read_text())["base_accuracy"]
    print("\nbase accuracy per domain: " + ", ".join(f"{g} {a:.2f}" for g, a in sorted(base.items())))
    print("effect of ablating each domain's specialized routes (mean over domains; random = same number "
          "of random real routes):")
    print(f"{'method':<8} {'measure':<14} {'targeted':>9} {'off-target':>11} {'random':>9} "
          f"{'selectivity':>12} {'vs random':>10}")
    for method, s in summary.items():
        for label, suffix, prefix in (("accuracy drop", "drop", ""), ("loss increase", "loss_increase", "loss_")):
            if f"targeted_{suffix}" not in s:
                continue
            print(f"{method:<8} {label:<14} {_fmt(s[f'targeted_{suffix}']):>9} {_fmt(s[f'off_target_{suffix}']):>11} "
                  f"{_fmt(s[f'random_{suffix}']):>9} {s[f'{prefix}selectivity']:>12.2f} {s[f'{prefix}vs_random']:>10.2f}")
    seconds = time.perf_counter() - t0
    print(f"\ndemo finished in {seconds:.0f} s; open {report}")
    return {**summary, "seconds": seconds}
