"""Seed 001's toy MoE: batched-vs-one-by-one training speed and two reproductions.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_toy.py ratio [--models 100] [--steps 50] [--threads 1]
    PYTHONPATH=$PWD .venv/bin/python bench/bench_toy.py plateaus [--features 20 --hidden 5 --seeds 2] [--steps 3000] [--out DIR]
    PYTHONPATH=$PWD .venv/bin/python bench/bench_toy.py analyze SWEEP.csv

- ``ratio``: (wall-clock and process CPU time) the same grid of models (F=20, H=5, E in 1,2,4,8, k <= E, 10 feature probabilities,
  ``--models`` of them) trained for ``--steps`` steps, batch 256, (a) batched by
  ``engine.toy.sweep.run_sweep`` (one group per E) and (b) one by one with ``engine.toy.optimize``,
  side by side in one process; prints both times and the ratio. Also checks that the two give the
  same final losses.
- ``plateaus``: one expert (the dense toy model of Elhage et al. 2022), ``--features`` (20) and
  ``--hidden`` (5), uniform importance, 24 feature probabilities from ``--pmax`` (0.5) to 0.003, ``--seeds`` (2); prints per probability the mean
  dimensions per feature ``H / ||W||_F^2`` and how many features sit at D ~ 1, 1/2, 2/5, 1/3
  (within 0.03), and writes a PNG of every feature's D against sparsity.
- ``analyze``: reads a ``moetrace toy sweep`` table and asks whether network sparsity k/E or feature
  sparsity 1-p drives monosemanticity (Chaudhari et al. 2025): Spearman correlations and the share
  of variance explained by each factor (eta squared of a one-way grouping), plus a k/E x p table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch


def grid_specs(n_models: int):
    from engine.toy.sweep import grid

    probs = [float(v) for v in np.round(np.logspace(0, -2, 10), 5)]
    specs = grid(20, 5, [1, 2, 4, 8], [1, 2, 4, 8], probs, importance_decay=0.9, seeds=range(1 + (n_models - 1) // 100))
    return specs[:n_models]


def cmd_ratio(args) -> None:
    from engine.toy import MoEModel, optimize
    from engine.toy.sweep import run_sweep

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


PLATEAUS = {"1": 1.0, "1/2": 0.5, "2/5": 0.4, "1/3": 1 / 3}


def cmd_plateaus(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.toy.metrics import feature_dimensionality
    from engine.toy.sweep import grid, run_sweep

    torch.set_num_threads(args.threads)
    probs = [float(v) for v in np.round(np.logspace(np.log10(args.pmax), np.log10(0.003), 24), 5)]
    specs = grid(args.features, args.hidden, [1], [1], probs, importance_decay=1.0, seeds=range(args.seeds))
    table, models = run_sweep(specs, steps=args.steps, n_batch=args.batch, lr=args.lr, schedule="cosine",
                              print_freq=max(1, args.steps // 5))
    D = feature_dimensionality(models[0].W_experts.detach())[:, 0]  # [I, F], one expert
    norms = torch.linalg.vector_norm(models[0].W_experts.detach()[:, 0], dim=-1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"F={args.features}, H={args.hidden}, {args.seeds} seeds, {args.steps} steps, batch {args.batch}")
    print(f"| p | 1-p | H/||W||_F^2 (mean of seeds) | features represented (of {args.features}) | "
          + " | ".join(f"D~{k}" for k in PLATEAUS) + " |")
    print("|---|---|---|---|" + "---|" * len(PLATEAUS))
    for p in probs:
        rows = table.index[table["feature_probability"] == p].tolist()
        d = D[rows][norms[rows] > 0.5]
        counts = [int(((d - v).abs() < 0.03).sum()) for v in PLATEAUS.values()]
        print(f"| {p:.4f} | {1 - p:.4f} | {table.loc[rows, 'dims_per_feature'].mean():.3f} | "
              f"{table.loc[rows, 'n_represented'].mean():.1f} | " + " | ".join(str(c) for c in counts) + " |")
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    x = np.repeat(1 / table["feature_probability"].to_numpy()[:, None], D.shape[1], 1)
    keep = (norms > 0.5).numpy()
    ax.scatter(x[keep], D.numpy()[keep], s=6, alpha=0.6, label="D_i of a represented feature")
    ax.plot(1 / table["feature_probability"], table["dims_per_feature"], "k.-", lw=0.8, label="H / ||W||_F^2")
    for name, v in PLATEAUS.items():
        ax.axhline(v, color="grey", lw=0.5, ls="--")
        ax.text(1.01, v, name, fontsize=8, va="center", transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel("1 / feature probability (sparser to the right)")
    ax.set_ylabel("dimensionality")
    ax.set_title(f"one expert (dense toy model), F={args.features}, H={args.hidden}, uniform importance")
    ax.legend(fontsize=8)
    fig.savefig(out / "plateaus.png")
    table.to_csv(out / "plateaus.csv", index_label="model")
    print(f"wrote {out / 'plateaus.png'}, {out / 'plateaus.csv'}")


def cmd_analyze(args) -> None:
    import pandas as pd
    from scipy.stats import spearmanr

    t = pd.read_csv(args.table)
    print(f"{len(t)} models; F={t['n_features'].iloc[0]}, H={t['n_hidden'].iloc[0]}, steps={t['steps'].iloc[0]}")
    print("| models | metric | Spearman rho with k/E | with 1-p | variance explained by k/E | by p |")
    print("|---|---|---|---|---|---|")
    for subset, sub in (("all", t), ("E > 1", t[t["n_experts"] > 1]), ("E > 1, k < E", t[t["n_active_experts"] < t["n_experts"]])):
        for metric in ("mean_expert_dim", "monosemantic_fraction", "mean_polysemanticity", "n_represented"):
            y = sub[metric].to_numpy()

            def eta2(col):
                means = sub.groupby(col)[metric].transform("mean").to_numpy()
                return float(((means - y.mean()) ** 2).sum() / ((y - y.mean()) ** 2).sum())

            r_net = spearmanr(sub["network_sparsity"], y).statistic
            r_feat = spearmanr(sub["feature_sparsity"], y).statistic
            print(f"| {subset} ({len(sub)}) | {metric} | {r_net:+.2f} | {r_feat:+.2f} | "
                  f"{eta2('network_sparsity'):.2f} | {eta2('feature_probability'):.2f} |")
    pivot = t.pivot_table(index="network_sparsity", columns="feature_probability", values="mean_expert_dim",
                          aggfunc="median")
    print("\nmedian mean_expert_dim, rows k/E, columns p:")
    print(pivot.round(2).to_string())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ratio")
    r.add_argument("--models", type=int, default=100)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--threads", type=int, default=1)
    pl = sub.add_parser("plateaus")
    pl.add_argument("--features", type=int, default=20)
    pl.add_argument("--hidden", type=int, default=5)
    pl.add_argument("--seeds", type=int, default=2)
    pl.add_argument("--pmax", type=float, default=0.5, help="densest feature probability")
    pl.add_argument("--steps", type=int, default=3000)
    pl.add_argument("--batch", type=int, default=256)
    pl.add_argument("--lr", type=float, default=3e-3)
    pl.add_argument("--threads", type=int, default=1)
    pl.add_argument("--out", default="bench_out/toy_plateaus")
    a = sub.add_parser("analyze")
    a.add_argument("table")
    args = p.parse_args(argv)
    {"ratio": cmd_ratio, "plateaus": cmd_plateaus, "analyze": cmd_analyze}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
