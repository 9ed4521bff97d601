"""Calibration and power of the experiment's targeted-vs-random test, on simulated experiments.

    .venv/bin/python bench/bench_calibration.py [--experiments 2000]

Simulates ablation experiments with ``moetrace.significance.simulate_ablation_experiments`` in the
demo's design (4 targeted groups, 200 items each, 20 random draws per group) with the draws'
variation measured in the demo (``moetrace.significance.DEMO_NULL``: accuracy items 0/1 at base
accuracy 0.98, draw harm 0.01 +- 0.01; loss: 0.14 +- 0.14 nats per draw, item noise sd 0.07) and a
second, noisier design (draw sd 0.05 for accuracy, item sd 0.5 nats for loss), and reports, at
alpha = 0.05:

- under the null (the targets are one more random draw): the false-positive rate of the
  experiment's test (``pooled_targeted_vs_random``: rank over draws, pooled over groups) and of
  the test it replaced (the item-level sign-flip test of targeted minus the mean of 2 draws,
  which treats that mean as fixed), each with its Monte Carlo standard error;
- the power of the draw test at the targeted-minus-random effects the demo measured (passed with
  ``--effects``; defaults are the demo's accuracy and loss effects per method, bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from moetrace.significance import combined_effect, pooled_targeted_vs_random, simulate_ablation_experiments, \
    PairedBootstrap

ALPHA = 0.05


def old_item_level_p(cells) -> float:
    """The replaced test: targeted minus the mean of the first 2 draws, items resampled only."""
    boot = PairedBootstrap({str(g): len(t) for g, (t, _r) in enumerate(cells)}, n_boot=200, seed=0)
    parts = [(str(g), 1.0 / len(cells), t - r[:2].mean(axis=0), None) for g, (t, r) in enumerate(cells)]
    effect, _ = combined_effect(parts, boot, seed=0)
    return effect.p_value


def rate(flags: list[bool]) -> tuple[float, float]:
    p = float(np.mean(flags))
    return p, float(np.sqrt(p * (1 - p) / len(flags)))


def rejection_rate(n: int, seed: int, old: bool = False, **design) -> tuple[float, float]:
    flags = []
    for cells in simulate_ablation_experiments(n, seed=seed, **design):
        p = old_item_level_p(cells) if old else pooled_targeted_vs_random([(t, r, None) for t, r in cells],
                                                                           n_boot=10).p_value
        flags.append(p <= ALPHA)
    return rate(flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", type=int, default=2000)
    ap.add_argument("--old-experiments", type=int, default=1000, help="experiments for the replaced test (slower)")
    ap.add_argument("--effects", type=float, nargs="*", default=None,
                    help="targeted - random effects to measure power at (accuracy then loss are both run)")
    args = ap.parse_args()
    designs = {"accuracy (demo)": dict(kind="accuracy"), "loss (demo)": dict(kind="loss"),
               "accuracy (noisier)": dict(kind="accuracy", mean_harm=0.05, draw_sd=0.05),
               "loss (noisier)": dict(kind="loss", mean_harm=0.15, draw_sd=0.05, item_sd=0.5)}
    print(f"| measure | test | simulated experiments | false-positive rate at {ALPHA} | MC s.e. | "
          f"limit ({ALPHA} + 2 s.e.) | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, design in designs.items():
        for old in (False, True):
            n = args.old_experiments if old else args.experiments
            t0 = time.perf_counter()
            fpr, se = rejection_rate(n, seed=1, old=old, **design)
            label = "targeted minus mean of 2 draws, items only (replaced)" if old else "rank over 20 draws, pooled"
            print(f"| {name} | {label} | {n} | {fpr:.3f} | {se:.3f} | {ALPHA + 2 * se:.3f} | "
                  f"{time.perf_counter() - t0:.0f} |")
    print()
    effects = args.effects if args.effects is not None else [0.003, 0.01, 0.03, 0.064, 0.094, 0.3]
    print("| measure | targeted - random (harm added to the targets) | power at 0.05 | MC s.e. |")
    print("|---|---|---|---|")
    for name, design in list(designs.items())[:2]:  # power in the demo's design
        for effect in effects:
            power, se = rejection_rate(max(200, args.experiments // 5), seed=2, extra_harm=effect, **design)
            print(f"| {name} | {effect:+.3f} | {power:.3f} | {se:.3f} |")


if __name__ == "__main__":
    main()
