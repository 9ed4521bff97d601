"""Seed 001's toy MoE: batched-vs-one-by-one training speed, the cost of the papers' full designs, and
the analysis of a sweep in moetrace's own (per-expert hidden size) design.

    .venv/bin/python bench/bench_toy.py ratio [--models 100] [--steps 50] [--threads 1]
    .venv/bin/python bench/bench_toy.py cost [--steps 3] [--threads 1]
    .venv/bin/python bench/bench_toy.py analyze SWEEP.csv

The reproductions themselves are ``moetrace toy reproduce chaudhari|elhage [--quick]``
(engine/toy/reproduce.py).

- ``ratio``: (wall-clock and process CPU time) the same grid of models (F=20, H=5, E in 1,2,4,8, k <= E, 10 feature probabilities,
  ``--models`` of them) trained for ``--steps`` steps, batch 256, (a) batched by
  ``moetrace.toy.sweep.run_sweep`` (one group per E) and (b) one by one with ``moetrace.toy.optimize``,
  side by side in one process; prints both times and the ratio. Also checks that the two give the
  same final losses.
- ``cost``: times ``--steps`` steps of every batched group of each paper design at its full size
  (a share of the phase-diagram groups, scaled up) and projects the CPU hours of the full runs.
- ``analyze``: reads a ``moetrace toy sweep`` table and asks whether network sparsity k/E or feature
  sparsity 1-p goes with features per dimension and the weight-based representation metrics:
  Spearman correlations and the share of variance explained by each factor (eta squared of a
  one-way grouping), with 95% intervals over seeds of each (E, k)'s mean features per dimension.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


def grid_specs(n_models: int):
    from moetrace.toy.sweep import grid

    probs = [float(v) for v in np.round(np.logspace(0, -2, 10), 5)]
    specs = grid(20, 5, [1, 2, 4, 8], [1, 2, 4, 8], probs, importance_decay=0.9, seeds=range(1 + (n_models - 1) // 100))
    return specs[:n_models]


def cmd_ratio(args) -> None:
    from moetrace.toy import MoEModel, optimize
    from moetrace.toy.sweep import run_sweep

    torch.set_num_threads(args.threads)
    specs = grid_specs(args.models)
    t0, c0 = time.perf_counter(), time.process_time()
    table, _ = run_sweep(specs, steps=args.steps, n_batch=256, print_freq=10**9, device="cpu")
    t_batched, c_batched = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    single_final = []
    for s in specs:
        m = MoEModel(s.config(), torch.tensor(s.feature_probability), s.importance(), device="cpu", seed=s.seed)
        hist = optimize(m, n_batch=256, steps=args.steps, print_freq=10**9)
        single_final.append(float(hist["reconstruction_loss"][-max(1, args.steps // 10):].mean()))
    t_single, c_single = time.perf_counter() - t0, time.process_time() - c0
    diff = np.abs(np.array(single_final) - table["final_loss"].to_numpy()).max()
    print("| models | steps | batch | threads | clock | batched s | one by one s | ratio | max final-loss diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for clock, b, o in (("wall", t_batched, t_single), ("CPU", c_batched, c_single)):
        print(f"| {len(specs)} | {args.steps} | 256 | {args.threads} | {clock} | {b:.2f} | {o:.2f} | {o / b:.1f}x | "
              f"{diff:.1e} |")


def cmd_cost(args) -> None:
    """Measure a few training steps of every group of each paper design at full size; project the full run."""
    from moetrace.toy import reproduce
    from moetrace.toy.batched import BatchedMoE, train_batched
    from moetrace.toy.model import Config

    torch.set_num_threads(args.threads)

    def timed(configs, probs, importances, steps_full, n_batch):
        model = BatchedMoE(configs, probs, importances, list(range(len(configs))), device="cpu",
                           feature_reduction="mean")
        train_batched(model, n_batch=n_batch, steps=1, print_freq=10**9)  # warm-up
        c0 = time.process_time()
        train_batched(model, n_batch=n_batch, steps=args.steps, print_freq=10**9)
        per_step = (time.process_time() - c0) / args.steps
        return per_step, per_step * steps_full

    print(f"| design | group | models | batch | CPU s per step | projected CPU hours ({args.threads} thread) |")
    print("|---|---|---|---|---|---|")
    total = {}
    c = reproduce.ChaudhariDesign()
    for a in c.architectures:
        n = len(c.feature_probabilities) * c.seeds
        per, full = timed([Config(c.n_features, a.n_hidden, a.n_experts, a.n_active)] * n,
                          [p for p in c.feature_probabilities for _ in range(c.seeds)], [None] * n, c.steps, c.n_batch)
        total["chaudhari features per dimension"] = total.get("chaudhari features per dimension", 0) + full
        print(f"| Chaudhari features per dimension | {a.label} | {n} | {c.n_batch} | {per:.3f} | {full / 3600:.2f} |")
    ph = reproduce.PhaseDesign()
    cells = len(ph.sparsities) * len(ph.importances)
    share = args.phase_share
    for n_feat, m, E in ph.architectures:
        n = max(1, int(cells * ph.models_per_cell * share))
        per, full = timed([Config(n_feat, m, E, 1)] * n, [0.5] * n, [None] * n, ph.steps, ph.n_batch)
        full /= share
        total["chaudhari phase diagrams"] = total.get("chaudhari phase diagrams", 0) + full
        print(f"| Chaudhari phase diagrams | {n_feat}-{m}-{E} | {cells * ph.models_per_cell} (timed {n}) | "
              f"{ph.n_batch} | {per / share:.3f} | {full / 3600:.2f} |")
    e = reproduce.ElhageDesign()
    n = len(e.feature_probabilities) * e.seeds
    per, full = timed([Config(e.n_features, e.n_hidden, 1, 1)] * n, [p for p in e.feature_probabilities for _ in range(e.seeds)],
                      [None] * n, e.steps, e.n_batch)
    total["elhage plateaus"] = full
    print(f"| Elhage plateaus | dense {e.n_features}x{e.n_hidden} | {n} | {e.n_batch} | {per:.3f} | {full / 3600:.2f} |")
    for name, secs in total.items():
        print(f"{name}: {secs / 3600:.1f} CPU hours projected")


def cmd_analyze(args) -> None:
    import pandas as pd
    from scipy.stats import spearmanr

    t = pd.read_csv(args.table)
    print(f"{len(t)} models; F={t['n_features'].iloc[0]}, H={t['n_hidden'].iloc[0]}, steps={t['steps'].iloc[0]}")
    print("| models | metric | Spearman rho with k/E | with 1-p | variance explained by k/E | by p |")
    print("|---|---|---|---|---|---|")
    for subset, sub in (("all", t), ("E > 1", t[t["n_experts"] > 1]), ("E > 1, k < E", t[t["n_active_experts"] < t["n_experts"]])):
        for metric in ("features_per_dim", "mean_expert_dim", "n_represented", "monosemantic_fraction"):
            y = sub[metric].to_numpy()

            def eta2(col):
                means = sub.groupby(col)[metric].transform("mean").to_numpy()
                return float(((means - y.mean()) ** 2).sum() / ((y - y.mean()) ** 2).sum())

            r_net = spearmanr(sub["network_sparsity"], y).statistic
            r_feat = spearmanr(sub["feature_sparsity"], y).statistic
            print(f"| {subset} ({len(sub)}) | {metric} | {r_net:+.2f} | {r_feat:+.2f} | "
                  f"{eta2('network_sparsity'):.2f} | {eta2('feature_probability'):.2f} |")
    from moetrace.toy.reproduce import interval

    t["seed_index"] = t["seed"] // 1_000_003  # moetrace.toy.sweep.grid: seed * 1_000_003 + index
    print("\n| E | k | k/E | active hidden k*H | seeds | features per dimension, mean over p (95% interval over seeds) |")
    print("|---|---|---|---|---|---|")
    for (E, k), g in t.groupby(["n_experts", "n_active_experts"]):
        per_seed = g.groupby("seed_index")["features_per_dim"].mean()
        mean, lo, hi = interval(per_seed)
        print(f"| {E} | {k} | {k / E:g} | {k * g['n_hidden'].iloc[0]} | {len(per_seed)} | {mean:.3f} [{lo:.3f}, {hi:.3f}] |")
    pivot = t.pivot_table(index="network_sparsity", columns="feature_probability", values="features_per_dim",
                          aggfunc="median")
    print("\nmedian features per dimension, rows k/E, columns p:")
    print(pivot.round(2).to_string())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ratio")
    r.add_argument("--models", type=int, default=100)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--threads", type=int, default=1)
    c = sub.add_parser("cost")
    c.add_argument("--steps", type=int, default=3, help="timed steps per group")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--phase-share", type=float, default=0.05,
                   help="time this share of a phase-diagram group's models and scale up (the full group is 22,620)")
    a = sub.add_parser("analyze")
    a.add_argument("table")
    args = p.parse_args(argv)
    {"ratio": cmd_ratio, "cost": cmd_cost, "analyze": cmd_analyze}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
