"""``moetrace demo``: the whole engine on the built-in model, from a fresh clone.

1. load the demo model: the small OLMoE trained on the demo's synthetic domains that ships with
   moetrace (``engine/demo/checkpoint``, its hash checked), loaded with ``from_pretrained`` like
   any local checkpoint; ``retrain=True`` (``moetrace demo --retrain``) rebuilds it instead and
   reports whether the rebuilt weights' hash matches the shipped one;
2. run the ablation experiment (``run_demo_experiment``: ``moetrace.experiment.run_experiment``)
   on its multiple-choice questions (answer scoring) and texts (200 + 200 per domain), with the
   targets selected on the routing of 200 held-out texts per domain: base evaluation with chance
   and answer-blind baselines, counts, each domain's specialized paths / experts / pairs, every
   domain evaluated under each ablation, ``DEMO_RANDOM`` coverage-matched random draws per
   target, and the dose-response ladder ``DEMO_DOSES``; writes ``results.csv``, ``items.csv``,
   ``base.csv``, ``dose_response.csv``, ``summary.json``, ``trace.zarr``, ``counts.zarr``,
   ``targets/``;
3. run the seed-003 analyses on the demo model (``moetrace.analysis.suite.run_suite``: router
   decisiveness, router statistics, expert similarity, a 2-D map, a profile and a steering
   example) into ``analysis/``, then write ``report.html`` (``moetrace.report.write_report``);
4. run the trace walk-through of seed 000's CSV workflow into ``csv_demo/``
   (``moetrace.demo.trace.run_trace_demo``: import, count, targets, coverage, Parquet);
5. print the summary table, where the report and the demo checkpoint are, and write
   ``prompts.jsonl`` (prompts in the demo tokenizer's words) with the command that captures them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from moetrace.demo.model import (QUESTIONS_FILE, SELECT_TEXTS_FILE, TEXTS_FILE, check_shipped_model, ensure_demo_model,
                                 load_demo_model, retrain_demo_model)


# Seed 000's thresholds (1 / 5 / 5) assume many groups (its domain x language cells): an item is
# kept when its share from the group is >= threshold x the group's share. With the demo's four
# domains (share about 0.25) a threshold of 5 can never be met, so every method uses 2 here: an
# item is specialized when at least half of its uses come from one domain.
DEMO_THRESHOLDS = {"paths": 2.0, "experts": 2.0, "pairs": 2.0}
# Matched random draws per target (the headline test's p-value is a rank among them, pooled over
# the four domains: it can reach 1 / 21^4), the dose ladder with DEMO_DOSE_RANDOM draws per step
# (at "all" the main run's first ones) and the scoring batch (inputs per forward pass: a
# forward's fixed cost dominates at this model's size, so large batches are ~6x faster than 32).
DEMO_RANDOM = 20
DEMO_DOSES = (1, 8, "all")
DEMO_DOSE_RANDOM = 5
DEMO_BATCH = 256


def run_demo(out: str | Path = "demo_out", *, n_random: int = DEMO_RANDOM, retrain: bool = False,
             progress: bool = True) -> dict:
    """Run the demo into ``out``; returns the experiment summary (also in ``out/summary.json``)."""
    from moetrace.demo.trace import run_trace_demo
    from moetrace.evaluate import load_texts
    from moetrace.results import summary_lines
    from moetrace.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if retrain:
        model_dir, same = retrain_demo_model(progress=progress)
        print(f"retrained the demo model into {model_dir}: its weights' SHA-256 "
              + ("matches the shipped model's" if same else "differs from the shipped model's (another CPU "
                 "instruction set or torch version trains other bits; the experiment runs on the retrained model)"))
    else:
        model_dir = ensure_demo_model(progress=progress)
        check_shipped_model()
    model, tokenizer = load_demo_model(model_dir)
    def took() -> str:
        return f" ({time.perf_counter() - t0:.0f} s)"

    print(f"[1/4] demo model: {model_dir} ({type(model).__name__}, "
          f"{model.config.num_hidden_layers} layers, {model.config.num_experts} experts, "
          f"top-{model.config.num_experts_per_tok}){took()}")
    print(f"[2/4] experiment: base evaluation, routing capture, each domain's targets ablated beside {n_random} "
          "random draws each ... (the longest stage)", flush=True)
    summary = run_demo_experiment(model, tokenizer, model_dir, out, n_random=n_random, progress=progress)
    texts = load_texts(model_dir / TEXTS_FILE)
    print(f"[2/4] experiment on {summary['n_questions']} questions and {len(texts)} texts -> {out / 'results.csv'}"
          f"{took()}")
    print("[3/4] seed-003 analyses and the report ...", flush=True)

    from moetrace.analysis.suite import run_suite
    from moetrace.demo.data import make_training_documents

    docs = make_training_documents(200, seed=1)
    run_suite(model, [tokenizer(d["text"])["input_ids"] for d in docs], [f"{d['domain']}/{d['lang']}" for d in docs],
              out / "analysis", num_tokens=2000, pad_id=tokenizer.pad_token_id or 0, decode=tokenizer.decode,
              method="pca")  # UMAP's first call compiles for ~30 s: `moetrace dim-reduc --method umap` draws it
    report = write_report(out, out / "report.html", title="moetrace demo")
    print(f"[3/4] report -> {report}{took()}")
    run_trace_demo(out / "csv_demo", progress=False, verbose=False)
    print(f"[4/4] seed 000 CSV walk-through -> {out / 'csv_demo'}{took()}")

    print("\n" + "\n".join(base_lines(summary["base"])))
    print(f"\neffect of ablating each domain's specialized routes, selected on {summary['selection']} "
          f"(mean over domains; random: {summary['n_random']} draws per target of as many real routes per layer, "
          f"used by no domain's targets, matched on the domain's traffic where possible; [95% interval: paired "
          f"bootstrap over items, two-level over draws and items for targeted - random]; p: rank of the targeted "
          f"effect among the draws, pooled over domains; Holm over the 6 primary tests (accuracy, loss x 3 methods); "
          f"sel. = targeted / off-target):")
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
    """The demo's ablation experiment on the demo model's questions and texts, by domain, with
    targets selected on its held-out selection texts, ``DEMO_THRESHOLDS``, ``n_random`` matched
    draws (and the dose-response ladder ``doses``, reroute mode) into ``out``.

    Returns ``summary.json`` as a dict, plus ``n_questions``. ``bench/bench_demo_seeds.py`` runs the
    same function on demo models trained from other seeds.
    """
    from moetrace.evaluate import load_questions, load_texts
    from moetrace.experiment import run_experiment

    model_dir, out = Path(model_dir), Path(out)
    questions = load_questions(model_dir / QUESTIONS_FILE)
    texts = load_texts(model_dir / TEXTS_FILE)
    select_texts = load_texts(model_dir / SELECT_TEXTS_FILE)
    run_experiment(model, tokenizer, questions, out, texts=texts, select_texts=select_texts, by=("domain",),
                   thresholds=DEMO_THRESHOLDS, n_random=n_random, batch_size=DEMO_BATCH, doses=doses,
                   dose_random=min(n_random, DEMO_DOSE_RANDOM), progress=progress)
    summary = json.loads((out / "summary.json").read_text())
    summary["n_questions"] = len(questions)
    return summary


def base_lines(base: dict) -> list[str]:
    """Per group: base accuracy with its 95% interval beside chance and the answer-blind baseline,
    and whether accuracy effects are testable there."""
    lines = ["base accuracy per domain [95% Clopper-Pearson], chance, answer-blind (options scored without the "
             "question):"]
    for group, r in sorted(base.items()):
        blind = "n/a" if r["blind_accuracy"] != r["blind_accuracy"] else f"{r['blind_accuracy']:.2f}"
        verdict = "testable" if r["testable"] else "NOT TESTABLE on accuracy (not clearly above both baselines)"
        lines.append(f"  {group:<10} {r['base_accuracy']:.3f} [{r['base_ci_low']:.3f}, {r['base_ci_high']:.3f}]  "
                     f"chance {r['chance']:.2f}  blind {blind}  {verdict}")
    return lines


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
