"""The demo's experiment on demo models trained from several seeds: how much of its answer is the seed.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_demo_seeds.py [--seeds 0 1 2] [--work DIR]

For each seed: builds (or reuses, in ``$MOETRACE_CACHE``) the demo model with ``DemoConfig(seed=s)``
(training data order, initial weights, evaluation questions and texts all follow the seed), runs
``engine.demo.run.run_demo_experiment`` into ``DIR/seed-<s>`` and prints one markdown row per seed,
method and measure: the targeted, off-target and random-control effects with their 95% intervals and
the targeted-minus-random difference with its p-value; then per method and measure the mean and
standard deviation over seeds of the targeted-minus-random difference and how many seeds find it
significant at 5%. Also prints each build's base accuracy, weights hash and wall times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _effect(e: dict) -> str:
    return f"{e['estimate']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--work", default="/tmp/demo_seeds")
    args = ap.parse_args()

    from engine.demo.model import BUILD_INFO, DemoConfig, ensure_demo_model, load_demo_model
    from engine.demo.run import run_demo_experiment

    rows, builds = [], []
    for seed in args.seeds:
        t0 = time.perf_counter()
        model_dir = ensure_demo_model(config=DemoConfig(seed=seed), progress=False)
        build_s = time.perf_counter() - t0
        info = json.loads((model_dir / BUILD_INFO).read_text())
        model, tok = load_demo_model(model_dir)
        t0 = time.perf_counter()
        summary = run_demo_experiment(model, tok, model_dir, Path(args.work) / f"seed-{seed}", progress=False)
        builds.append((seed, info, build_s, time.perf_counter() - t0, summary["base_accuracy"]))
        for method, s in summary.items():
            if not isinstance(s, dict) or "intervals" not in s:
                continue
            for measure, iv in s["intervals"].items():
                rows.append((seed, method, measure, iv))

    print("| seed | weights sha256 (first 12) | platform | build s (train s) | experiment s | base accuracy |")
    print("|---|---|---|---|---|---|")
    for seed, info, build_s, exp_s, base in builds:
        acc = ", ".join(f"{g} {a:.2f}" for g, a in sorted(base.items()))
        print(f"| {seed} | {info.get('weights_sha256', '?')[:12]} | {info.get('platform', '?')} | "
              f"{build_s:.0f} ({info['train_seconds']:.0f}) | {exp_s:.0f} | {acc} |")
    print()
    print("| seed | method | measure | targeted | off-target | random | targeted - random | p vs random |")
    print("|---|---|---|---|---|---|---|---|")
    for seed, method, measure, iv in rows:
        d = iv["targeted_minus_random"]
        print(f"| {seed} | {method} | {measure} | {_effect(iv['targeted'])} | {_effect(iv['off_target'])} | "
              f"{_effect(iv['random'])} | {_effect(d)} | {d['p_value']:.3g} |")
    print()
    print("| method | measure | targeted - random: mean over seeds | sd | seeds with CI > 0 | seeds |")
    print("|---|---|---|---|---|---|")
    for method, measure in sorted({(m, x) for _, m, x, _ in rows}):
        diffs = [iv["targeted_minus_random"] for _, m, x, iv in rows if (m, x) == (method, measure)]
        est = np.asarray([d["estimate"] for d in diffs])
        above = sum(d["ci_low"] > 0 for d in diffs)
        print(f"| {method} | {measure} | {est.mean():+.3f} | {est.std(ddof=1) if len(est) > 1 else float('nan'):.3f} | "
              f"{above} | {len(diffs)} |")


if __name__ == "__main__":
    main()
