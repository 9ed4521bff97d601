"""The demo's experiment on demo models trained from several seeds: how much of its answer is the seed.

    .venv/bin/python bench/bench_demo_seeds.py [--seeds 0 1 2] [--work DIR]

For each seed: builds (or reuses, in ``$MOETRACE_CACHE``) the demo model with ``DemoConfig(seed=s)``
(training data order, initial weights, evaluation questions and texts all follow the seed), runs
``moetrace.demo.run.run_demo_experiment`` into ``DIR/seed-<s>`` and prints one markdown row per seed,
method and measure: the targeted, off-target and random-draw effects with their 95% intervals and
the targeted-minus-random difference (two-level interval) with its p-value over draws (Holm-adjusted
for the primary tests); then per method and measure the mean and standard deviation over seeds of
the targeted-minus-random difference, how many seeds have its interval above 0 and how many reject
at 5% after Holm. Also prints each build's base accuracy, weights hash and wall times. Seed 0 is
the shipped model; other seeds train in ``$MOETRACE_CACHE`` (about 5 minutes each on one core).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _effect(e: dict) -> str:
    if "ci_low" not in e:
        return "n/a" if e.get("estimate") != e.get("estimate") else f"{e['estimate']:+.3f}"
    return f"{e['estimate']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="/tmp/demo_seeds")
    args = ap.parse_args()

    from moetrace.demo.model import BUILD_INFO, DemoConfig, ensure_demo_model, load_demo_model
    from moetrace.demo.run import run_demo_experiment
    from moetrace.results import MEASURES

    rows, builds = [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        model_dir = ensure_demo_model(config=DemoConfig(seed=seed), progress=False)  # seed 0: the shipped model
        build_s = time.perf_counter() - t0
        info = json.loads((model_dir / BUILD_INFO).read_text())
        model, tok = load_demo_model(model_dir)
        t0 = time.perf_counter()
        summary = run_demo_experiment(model, tok, model_dir, Path(args.work) / f"seed-{seed}", progress=False)
        base = {g: r["base_accuracy"] for g, r in summary["base"].items()}
        builds.append((seed, info, build_s, time.perf_counter() - t0, base))
        for method, entries in summary.items():
            if not isinstance(entries, dict) or method == "base":
                continue
            for measure, e in entries.items():
                if measure in MEASURES:
                    rows.append((seed, method, measure, e))

    print("| seed | weights sha256 (first 12) | platform | build s (train s) | experiment s | base accuracy (answer) |")
    print("|---|---|---|---|---|---|")
    for seed, info, build_s, exp_s, base in builds:
        acc = ", ".join(f"{g} {a:.2f}" for g, a in sorted(base.items()))
        print(f"| {seed} | {info.get('weights_sha256', '?')[:12]} | {info.get('platform', '?')} | "
              f"{build_s:.0f} ({info['train_seconds']:.0f}) | {exp_s:.0f} | {acc} |")
    print()
    print("| seed | method | measure | targeted | off-target | random (mean of draws) | targeted - random | p (Holm) |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, method, measure, e in rows:
        d = e["targeted_minus_random"]
        p = f"{d['p_value']:.2g}" + (f" ({d['p_holm']:.2g})" if "p_holm" in d else "") if "p_value" in d else "n/a"
        print(f"| {seed} | {method} | {measure} | {_effect(e['targeted'])} | {_effect(e['off_target'])} | "
              f"{_effect(e['random'])} | {_effect(d)} | {p} |")
    print()
    print("| method | measure | targeted - random: mean over seeds | sd over seeds | seeds with CI > 0 | "
          "seeds with p < 0.05 (Holm, primary) | seeds |")
    print("|---|---|---|---|---|---|---|")
    for method, measure in sorted({(m, x) for _, m, x, _ in rows}):
        diffs = [e["targeted_minus_random"] for _, m, x, e in rows if (m, x) == (method, measure)]
        est = np.asarray([d["estimate"] for d in diffs])
        above = sum(d.get("ci_low", float("nan")) > 0 for d in diffs)
        holm = sum(d.get("p_holm", 1.0) < 0.05 for d in diffs) if any("p_holm" in d for d in diffs) else "-"
        print(f"| {method} | {measure} | {np.nanmean(est):+.3f} | "
              f"{np.nanstd(est, ddof=1) if len(est) > 1 else float('nan'):.3f} | {above} | {holm} | {len(diffs)} |")


if __name__ == "__main__":
    main()
