"""``moetrace demo``: the whole engine on the built-in model, from a fresh clone.

1. build (first run, cached afterwards) or load the demo model: a small OLMoE trained on the
   demo's synthetic domains (``engine.demo.model``), loaded with ``from_pretrained`` like any
   local checkpoint;
2. run the ablation experiment (``run_demo_experiment``: ``engine.experiment.run_experiment``)
   on its held-out multiple-choice questions and texts (200 + 200 per domain): base evaluation
   with capture, counts, each domain's specialized paths / experts / pairs, every domain
   evaluated under each ablation, random controls, and the dose-response ladder ``DEMO_DOSES``;
   writes ``results.csv``, ``items.csv``, ``dose_response.csv``, ``summary.json``,
   ``trace.zarr``, ``counts.zarr``, ``targets/``;
3. run the seed-003 analyses on the demo model (``engine.analysis.suite.run_suite``: router
   decisiveness, router statistics, expert similarity, a 2-D map, a profile and a steering
   example) into ``analysis/``, then write ``report.html`` (``engine.report.write_report``);
4. run the trace walk-through of seed 000's CSV workflow into ``csv_demo/``
   (``engine.demo.trace.run_trace_demo``: import, count, targets, coverage, Parquet);
5. print the summary table, where the report and the demo checkpoint are, and write
   ``prompts.jsonl`` (prompts in the demo tokenizer's words) with the command that captures them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from engine.demo.model import QUESTIONS_FILE, TEXTS_FILE, ensure_demo_model, load_demo_model


# Seed 000's thresholds (1 / 5 / 5) assume many groups (its domain x language cells): an item is
# kept when its share from the group is >= threshold x the group's share. With the demo's four
# domains (share about 0.25) a threshold of 5 can never be met, so every method uses 2 here: an
# item is specialized when at least half of its uses come from one domain.
DEMO_THRESHOLDS = {"paths": 2.0, "experts": 2.0, "pairs": 2.0}
# Random controls per target, the dose ladder with one random control per step (so the whole
# demo stays under 5 minutes on 2 cores; at "all" it is the main run's first) and the scoring batch
# (prompts per forward pass: a forward's fixed cost dominates at this model's size, so large
# batches are ~6x faster than 32).
DEMO_RANDOM = 2
DEMO_DOSES = (1, 8, "all")
DEMO_DOSE_RANDOM = 1
DEMO_BATCH = 256


def run_demo(out: str | Path = "demo_out", *, n_random: int = DEMO_RANDOM, progress: bool = True) -> dict:
    """Run the demo into ``out``; returns the experiment summary (also in ``out/summary.json``)."""
    from engine.demo.trace import run_trace_demo
    from engine.evaluate import load_texts
    from engine.experiment import summary_lines
    from engine.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = ensure_demo_model(progress=progress)
    model, tokenizer = load_demo_model(model_dir)
    print(f"[1/4] demo model: {model_dir} ({type(model).__name__}, "
          f"{model.config.num_hidden_layers} layers, {model.config.num_experts} experts, "
          f"top-{model.config.num_experts_per_tok})")

    summary = run_demo_experiment(model, tokenizer, model_dir, out, n_random=n_random, progress=progress)
    texts = load_texts(model_dir / TEXTS_FILE)
    print(f"[2/4] experiment on {summary['n_questions']} questions and {len(texts)} texts -> {out / 'results.csv'}")

    from engine.analysis.suite import run_suite
    from engine.demo.data import make_training_documents

    docs = make_training_documents(200, seed=1)
    run_suite(model, [tokenizer(d["text"])["input_ids"] for d in docs], [f"{d['domain']}/{d['lang']}" for d in docs],
              out / "analysis", num_tokens=2000, pad_id=tokenizer.pad_token_id or 0, decode=tokenizer.decode,
              method="pca")  # UMAP's first call compiles for ~30 s: `moetrace dim-reduc --method umap` draws it
    report = write_report(out, out / "report.html", title="moetrace demo")
    print(f"[3/4] report -> {report}")
    run_trace_demo(out / "csv_demo", progress=False, verbose=False)
    print(f"[4/4] seed 000 CSV walk-through -> {out / 'csv_demo'}")

    base = summary.pop("base_accuracy")
    print("\nbase accuracy per domain: " + ", ".join(f"{g} {a:.2f}" for g, a in sorted(base.items())))
    print("effect of ablating each domain's specialized routes (mean over domains; random = the same number "
          "of random real routes; [95% paired-bootstrap interval]; p: sign-flip permutation test over items; "
          "selectivity = targeted / off-target):")
    print("\n".join(summary_lines(summary)))
    prompts = write_example_prompts(out / "prompts.jsonl", texts)
    print(f"\ndemo checkpoint: {model_dir}\n  an OlmoeForCausalLM with a word-level tokenizer that knows "
          f"{len(tokenizer)} tokens (whole lower-case words, the numbers 0-18 as digits, hex literals and number "
          f"words, a few symbols; anything else is [UNK]), listed in {model_dir / 'tokenizer.json'}; example "
          f"prompts in {prompts}. Trace them with:\n"
          f"  moetrace capture --model {model_dir} --data {prompts} {out / 'my_trace.zarr'} --labels domain,lang")
    seconds = time.perf_counter() - t0
    print(f"\ndemo finished in {seconds:.0f} s; open {report}")
    return {**summary, "seconds": seconds}


def run_demo_experiment(model, tokenizer, model_dir: str | Path, out: str | Path, *, n_random: int = DEMO_RANDOM,
                        doses: Sequence[int | str] | None = DEMO_DOSES, progress: bool = True) -> dict:
    """The demo's ablation experiment on the demo model's held-out questions and texts, by domain,
    with ``DEMO_THRESHOLDS`` (and the dose-response ladder ``doses``, reroute mode) into ``out``.

    Returns ``summary.json`` as a dict, plus ``n_questions``. ``bench/bench_demo_seeds.py`` runs the
    same function on demo models trained from other seeds.
    """
    from engine.evaluate import load_questions, load_texts
    from engine.experiment import run_experiment

    model_dir, out = Path(model_dir), Path(out)
    questions = load_questions(model_dir / QUESTIONS_FILE)
    texts = load_texts(model_dir / TEXTS_FILE)
    run_experiment(model, tokenizer, questions, out, texts=texts, by=("domain",), thresholds=DEMO_THRESHOLDS,
                   n_random=n_random, batch_size=DEMO_BATCH, doses=doses, dose_random=min(n_random, DEMO_DOSE_RANDOM),
                   progress=progress)
    summary = json.loads((out / "summary.json").read_text())
    summary["n_questions"] = len(questions)
    return summary


def write_example_prompts(path: Path, texts: list[dict[str, str]], per_group: int = 2) -> Path:
    """``per_group`` prompts per (domain, lang) of the demo texts, each the first statement of a
    text, as capture's JSONL input (``text``, ``domain``, ``lang``)."""
    seen: dict[tuple[str, str], int] = {}
    lines = []
    for t in texts:
        key = (t["domain"], t["lang"])
        if seen.get(key, 0) >= per_group:
            continue
        seen[key] = seen.get(key, 0) + 1
        first = t["text"].split(" . ")[0].rstrip(" .")
        lines.append(json.dumps({"text": first, "domain": t["domain"], "lang": t["lang"]}))
    path.write_text("\n".join(lines) + "\n")
    return path
