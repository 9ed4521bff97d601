"""The two papers seed 001 builds on, rerun in their own designs.

- :func:`run_chaudhari`: Chaudhari et al. 2025 (arXiv 2510.23671), "Sparsity and Superposition in
  Mixture of Experts", as their repository runs it (:data:`CHAUDHARI_SOURCE`): features per
  dimension of a dense model and three MoEs of the same total hidden size, against feature
  probability; and their phase diagrams of tiny models over sparsity x importance.
- :func:`run_elhage`: Elhage et al. 2022, "Toy Models of Superposition": the dense model's
  feature dimensionalities and their plateaus at 1, 3/4, 2/3, 1/2, 2/5, 3/8, 1/3.

Every design is a frozen dataclass holding the paper's settings; ``quick()`` gives a variant that
runs in minutes on two CPU cores (fewer points, steps and seeds; the model, data, loss, optimizer
and metric stay the paper's). Intervals over seeds are Student-t 95% intervals of the mean.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np
import pandas as pd
import torch
from scipy import stats

from moetrace.errors import MoetraceError
from moetrace.toy.batched import BatchedMoE, train_batched
from moetrace.toy.metrics import feature_dimensionality
from moetrace.toy.model import Config, constant_lr
from moetrace.toy.sweep import grid, run_sweep

log = logging.getLogger("moetrace.toy")

CHAUDHARI_COMMIT = "18be25e178a4e322590e9f9fbcc33c112ef91ac8"
CHAUDHARI_SOURCE = (
    f"github.com/MarmikChaudhari/superposition-moe at {CHAUDHARI_COMMIT}: demo-superposition.ipynb "
    "(weighted_avg_features_per_dim; the dense 1x20 and MoE 4x5 k=1, 10x2 k=2, 20x1 k=5 configs; "
    "density_vals_30; optimize_vectorized(n_batch=1024, steps=10000)), model/model.py (MoEModel, "
    "optimize_vectorized: AdamW lr 1e-3 constant, loss averaged over batch and features), "
    "phase_change_data/*.npz (config_params: n_features, n_hidden, n_experts, n_active_experts=1, "
    "steps=5000, n_models_per_cell=10; sparsity_values; importance_values)")
ELHAGE_SOURCE = (
    "Elhage et al.'s notebook is not readable offline; its feature-geometry cell as ported by "
    "github.com/callummcdougall/ARENA_2.0 at 20bdbe8563dc629511522f03320d1231c7b28722, "
    "chapter1_transformers/exercises/part7_toy_models_of_superposition/solutions.py: "
    "Config(n_features=200, n_hidden=20, n_instances=20), feature_probability = 20 ** -linspace(0, 1, 20), "
    "constant importance, optimize(): n_batch=1024, steps=10_000, AdamW lr 1e-3 constant")

# demo-superposition.ipynb: density_vals_30 = [round(1.0 - i * (0.9 / 29), 2) for i in range(30)]
PAPER_PROBABILITIES = tuple(round(1.0 - i * (0.9 / 29), 2) for i in range(30))
# phase_change_data/*.npz: sparsity_values, importance_values
PHASE_SPARSITIES = tuple(round(0.025 * i, 3) for i in range(1, 40))
PHASE_IMPORTANCES = tuple(round(0.1 + 0.05 * i, 2) for i in range(58))
ELHAGE_FRACTIONS = (Fraction(1), Fraction(3, 4), Fraction(2, 3), Fraction(1, 2), Fraction(2, 5), Fraction(3, 8),
                    Fraction(1, 3))


@dataclass(frozen=True)
class Architecture:
    """``n_experts`` experts of ``n_hidden`` dimensions each, ``n_active`` of them per input."""

    n_experts: int
    n_hidden: int
    n_active: int

    @property
    def label(self) -> str:
        if self.n_experts == 1:
            return f"dense (m={self.n_hidden})"
        return f"MoE {self.n_experts}x{self.n_hidden}, k={self.n_active}"

    @property
    def network_sparsity(self) -> float:
        return self.n_active / self.n_experts


def interval(values) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student-t 95% interval of the mean (NaN bounds for one value)."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half


# ------------------------------------------------------------------ Chaudhari et al.: features per dimension
@dataclass(frozen=True)
class ChaudhariDesign:
    """Features per dimension vs feature probability at a fixed total hidden size (their Fig. on dense vs MoE).

    Defaults are the paper's (:data:`CHAUDHARI_SOURCE`): n = 100 features, uniform importance,
    E x m = 20 for every architecture, p from 1.0 to 0.1 in 30 linear steps, 10,000 steps of batch
    1024 at lr 1e-3 constant (AdamW, weight decay 0.01), the loss averaged over features. The
    paper's curves average 5 runs; ``seeds`` runs per point here (>= 3).
    """

    n_features: int = 100
    architectures: tuple[Architecture, ...] = (Architecture(1, 20, 1), Architecture(4, 5, 1),
                                               Architecture(10, 2, 2), Architecture(20, 1, 5))
    feature_probabilities: tuple[float, ...] = PAPER_PROBABILITIES
    seeds: int = 3
    steps: int = 10_000
    n_batch: int = 1024
    lr: float = 1e-3
    eval_batch: int = 4096

    def quick(self) -> "ChaudhariDesign":
        """Every sixth probability (1.0, 0.81, 0.63, 0.44, 0.26), 1,500 steps of batch 256, 3 seeds."""
        return replace(self, feature_probabilities=self.feature_probabilities[::6], steps=1500, n_batch=256, seeds=3)


def run_chaudhari(design: ChaudhariDesign = ChaudhariDesign(), device=None) -> pd.DataFrame:
    """Train every (architecture, p, seed) of ``design``; one row per model (see :func:`run_sweep`).

    Each architecture is one batched group of ``len(p) x seeds`` instances. Adds ``architecture``
    (its label) and ``total_hidden`` (E x m).
    """
    if design.seeds < 1:
        raise MoetraceError(f"toy reproduce: seeds must be >= 1, got {design.seeds}")
    tables = []
    for arch in design.architectures:
        specs = grid(design.n_features, arch.n_hidden, [arch.n_experts], [arch.n_active],
                     design.feature_probabilities, 1.0, seeds=range(design.seeds))
        log.info("%s: %d models", arch.label, len(specs))
        table, _ = run_sweep(specs, steps=design.steps, n_batch=design.n_batch, lr=design.lr, schedule="constant",
                             print_freq=max(1, design.steps // 5), device=device, usage_batch=design.eval_batch,
                             feature_reduction="mean")
        table.insert(0, "architecture", arch.label)
        table["total_hidden"] = arch.n_experts * arch.n_hidden
        table["seed_index"] = np.tile(np.arange(design.seeds), len(design.feature_probabilities))
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def chaudhari_summary(table: pd.DataFrame, metrics=("features_per_dim", "final_loss", "n_represented")) -> pd.DataFrame:
    """Per (architecture, p): mean and 95% interval over seeds of each metric."""
    rows = []
    for (arch, p), g in table.groupby(["architecture", "feature_probability"], sort=False):
        row = {"architecture": arch, "network_sparsity": g["network_sparsity"].iloc[0], "feature_probability": p,
               "seeds": len(g)}
        for m in metrics:
            row[m], row[f"{m}_low"], row[f"{m}_high"] = interval(g[m])
        rows.append(row)
    return pd.DataFrame(rows)


def chaudhari_claims(table: pd.DataFrame) -> list[dict]:
    """The paper's claims about features per dimension, each as the measurement that could refute it.

    1. Every MoE packs fewer features per dimension than the dense model of the same total size:
       per MoE, at how many p the Welch 95% interval of (dense - MoE) lies above 0, below 0, or
       contains 0.
    2. Greater network sparsity (smaller k/E), fewer features per dimension: Spearman rho of k/E
       with features per dimension over all models at each p (median and range over p).
    """
    claims = []
    dense = table[table["n_experts"] == 1]
    for arch, g in table[table["n_experts"] > 1].groupby("architecture", sort=False):
        above = below = neither = 0
        diffs = []
        for p, gp in g.groupby("feature_probability"):
            d = dense.loc[dense["feature_probability"] == p, "features_per_dim"].to_numpy()
            m = gp["features_per_dim"].to_numpy()
            diffs.append(d.mean() - m.mean())
            if len(d) < 2 or len(m) < 2:
                neither += 1
                continue
            ci = stats.ttest_ind(d, m, equal_var=False).confidence_interval(0.95)
            above += ci.low > 0
            below += ci.high < 0
            neither += ci.low <= 0 <= ci.high
        claims.append({"claim": "dense packs more features per dimension", "architecture": arch,
                       "p_values": len(diffs), "dense_higher": int(above), "dense_lower": int(below),
                       "undecided": int(neither), "mean_difference": float(np.mean(diffs)),
                       "min_difference": float(np.min(diffs)), "max_difference": float(np.max(diffs))})
    rhos = []
    for p, g in table.groupby("feature_probability"):
        if g["network_sparsity"].nunique() > 1:
            rhos.append(float(stats.spearmanr(g["network_sparsity"], g["features_per_dim"]).statistic))
    if rhos:
        claims.append({"claim": "sparser networks (smaller k/E) pack fewer features per dimension",
                       "architecture": "all", "p_values": len(rhos), "rho_median": float(np.median(rhos)),
                       "rho_min": float(np.min(rhos)), "rho_max": float(np.max(rhos)),
                       "rho_positive": int(sum(r > 0 for r in rhos))})
    return claims


# ------------------------------------------------------------------ Chaudhari et al.: phase diagrams
@dataclass(frozen=True)
class PhaseDesign:
    """Phase diagrams of tiny models over feature sparsity x the last feature's importance.

    From the ``config_params``, ``sparsity_values`` and ``importance_values`` of their
    ``phase_change_data/*.npz``: architectures ``(n, m, E)`` 2-1-1, 2-1-2, 3-1-1, 3-1-2, 3-1-3,
    3-2-1, 3-2-2, 3-2-3 with k = 1; S = 0.025..0.975 (39), importance 0.1..2.95 (58); 5,000 steps;
    10 models per cell, the lowest final loss kept (one weight set per cell is stored). Not
    recorded there (their experiment notebook is empty at that commit), so taken from Elhage et
    al.'s phase-change set-up that they follow: the varied importance is the last feature's (the
    others 1), every feature has probability 1 - S; batch 1024 and lr 1e-3 constant are their
    code's defaults.
    """

    architectures: tuple[tuple[int, int, int], ...] = ((2, 1, 1), (2, 1, 2), (3, 1, 1), (3, 1, 2), (3, 1, 3),
                                                       (3, 2, 1), (3, 2, 2), (3, 2, 3))
    sparsities: tuple[float, ...] = PHASE_SPARSITIES
    importances: tuple[float, ...] = PHASE_IMPORTANCES
    models_per_cell: int = 10
    steps: int = 5000
    n_batch: int = 1024
    lr: float = 1e-3

    def quick(self) -> "PhaseDesign":
        """Every fourth sparsity and sixth importance (10 x 10 cells), 3 models per cell, 1,500 steps of batch 256."""
        return replace(self, sparsities=self.sparsities[::4], importances=self.importances[::6], models_per_cell=3,
                       steps=1500, n_batch=256)


ABSENT_NORM = 0.5        # the varied feature counts as represented in an expert when ||W_i^(e)|| >= 0.5
SUPERPOSED_SCORE = 0.5   # ... and as superposed there when sum_{j != i} (W_hat_i . W_j)^2 >= 0.5
PHASES = ("not represented", "dedicated", "superposed")


def norm_and_superposition(W: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature ``i``'s norm and superposition score ``sum_{j != i} (W_hat_i . W_j)^2`` in ``W [..., F, m]``: ``[...]`` each.

    The score their ``phase_change.ipynb`` documents; its code subtracts 1 for the self term, which
    is that only when ``||W_i|| = 1``, so the self term is left out exactly here.
    """
    norm = torch.linalg.vector_norm(W[..., i, :], dim=-1)
    w_hat = W[..., i, :] / norm.clamp_min(1e-12)[..., None]
    dots = torch.einsum("...h,...jh->...j", w_hat, W) ** 2
    return norm, dots.sum(-1) - dots[..., i]


def run_phase(design: PhaseDesign = PhaseDesign(), device=None) -> pd.DataFrame:
    """One row per (architecture, cell, expert) of the best model of the cell: the varied feature's
    norm and superposition score in that expert, its phase there, and the cell's final loss."""
    rows = []
    cells = list(itertools.product(design.sparsities, design.importances))
    for n, m, E in design.architectures:
        configs, probs, importances, seeds = [], [], [], []
        for c, (S, r) in enumerate(cells):
            for j in range(design.models_per_cell):
                configs.append(Config(n, m, E, 1))
                probs.append(1.0 - S)
                importances.append([1.0] * (n - 1) + [r])
                seeds.append(c * design.models_per_cell + j + 1_000_003 * (100 * n + 10 * m + E))
        model = BatchedMoE(configs, probs, importances, seeds, device=device, feature_reduction="mean")
        log.info("phase %d-%d-%d: %d models", n, m, E, len(configs))
        hist = train_batched(model, n_batch=design.n_batch, steps=design.steps, print_freq=max(1, design.steps // 5),
                             lr=design.lr, lr_scale=constant_lr)
        final = hist["reconstruction_loss"][-max(1, design.steps // 10):].mean(0).reshape(len(cells), -1)
        best = final.argmin(1)
        W = model.W_experts.detach().cpu().double().reshape(len(cells), design.models_per_cell, E, n, m)
        W_best = W[torch.arange(len(cells)), best]  # [cells, E, n, m]
        norm, score = norm_and_superposition(W_best, n - 1)  # [cells, E]
        for c, (S, r) in enumerate(cells):
            for e in range(E):
                phase = PHASES[0] if norm[c, e] < ABSENT_NORM else PHASES[2] if score[c, e] >= SUPERPOSED_SCORE else PHASES[1]
                rows.append({"architecture": f"{n}-{m}-{E}", "n_features": n, "n_hidden": m, "n_experts": E,
                             "sparsity": S, "importance": r, "expert": e, "norm": float(norm[c, e]),
                             "superposition": float(score[c, e]), "phase": phase,
                             "final_loss": float(final[c, best[c]]), "models_per_cell": design.models_per_cell,
                             "steps": design.steps})
    return pd.DataFrame(rows)


def phase_jumps(phase: pd.DataFrame) -> pd.DataFrame:
    """Per architecture: how abruptly the varied feature's representation changes across the grid.

    For each cell, the feature's largest norm over experts; over all pairs of neighbouring cells
    (one step in sparsity or in importance): the share whose norms differ by more than 0.5 (a
    jump between "not represented" and "represented" within one grid step), the largest
    difference, and how many of the three phases the strongest expert shows.
    """
    rows = []
    for arch, g in phase.groupby("architecture", sort=False):
        strongest = g.loc[g.groupby(["sparsity", "importance"])["norm"].idxmax()]
        grid_norm = strongest.pivot(index="sparsity", columns="importance", values="norm").to_numpy()
        diffs = np.concatenate([np.abs(np.diff(grid_norm, axis=0)).ravel(), np.abs(np.diff(grid_norm, axis=1)).ravel()])
        rows.append({"architecture": arch, "n_experts": int(g["n_experts"].iloc[0]), "cells": len(strongest),
                     "jump_share": float((diffs > 0.5).mean()), "largest_jump": float(diffs.max()),
                     "phases_seen": int(strongest["phase"].nunique()),
                     **{f"share_{p.replace(' ', '_')}": float((strongest["phase"] == p).mean()) for p in PHASES}})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------ Elhage et al.: dimensionality plateaus
@dataclass(frozen=True)
class ElhageDesign:
    """The dense toy model's feature dimensionality against sparsity (:data:`ELHAGE_SOURCE`).

    n = 200 features in m = 20 dimensions, uniform importance, 20 feature probabilities
    ``20 ** -linspace(0, 1, 20)`` (1 to 0.05), 10,000 steps of batch 1024, AdamW lr 1e-3 constant,
    the loss averaged over features. Their run is one model per probability; ``seeds`` here.
    Differences kept from moetrace's model: the bias is initialized xavier-normal (theirs: zeros).
    """

    n_features: int = 200
    n_hidden: int = 20
    feature_probabilities: tuple[float, ...] = tuple(float(v) for v in 20.0 ** -np.linspace(0, 1, 20))
    seeds: int = 3
    steps: int = 10_000
    n_batch: int = 1024
    lr: float = 1e-3
    tolerance: float = 0.02

    def quick(self) -> "ElhageDesign":
        """Every other probability, 2 seeds, 2,000 steps of batch 256 (n = 200, m = 20 kept)."""
        return replace(self, feature_probabilities=self.feature_probabilities[::2], seeds=2, steps=2000, n_batch=256)


def run_elhage(design: ElhageDesign = ElhageDesign(), device=None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(features, plateaus)``.

    features: one row per (p, seed, feature) with its norm and dimensionality D_i.
    plateaus: one row per (p, fraction) with the represented features (norm > 0.5) within
    ``tolerance`` of the fraction, summed over seeds, and in how many seeds at least one sits there;
    plus ``dims_per_feature`` (m / ||W||_F^2, mean over seeds) per p.
    """
    specs = grid(design.n_features, design.n_hidden, [1], [1], design.feature_probabilities, 1.0,
                 seeds=range(design.seeds))
    table, models = run_sweep(specs, steps=design.steps, n_batch=design.n_batch, lr=design.lr, schedule="constant",
                              print_freq=max(1, design.steps // 5), device=device, feature_reduction="mean")
    W = models[0].W_experts.detach().cpu().double()[:, 0]  # [I, F, m]
    D = feature_dimensionality(W)
    norms = torch.linalg.vector_norm(W, dim=-1)
    seed_of = np.tile(np.arange(design.seeds), len(design.feature_probabilities))
    features = pd.DataFrame({
        "feature_probability": np.repeat(table["feature_probability"].to_numpy(), design.n_features),
        "seed": np.repeat(seed_of, design.n_features),
        "feature": np.tile(np.arange(design.n_features), len(table)),
        "norm": norms.reshape(-1).numpy(), "dimensionality": D.reshape(-1).numpy(),
    })
    dims = table.groupby("feature_probability", sort=False)["dims_per_feature"].mean()
    return features, count_plateaus(features, dims, design.seeds, design.tolerance)


def count_plateaus(features: pd.DataFrame, dims_per_feature: pd.Series, seeds: int, tolerance: float) -> pd.DataFrame:
    """Per (p, fraction of :data:`ELHAGE_FRACTIONS`): represented features (norm > 0.5) whose
    dimensionality is within ``tolerance`` of the fraction, summed over seeds, and how many seeds
    have at least one. features: columns feature_probability, seed, norm, dimensionality."""
    rows = []
    for p, g in features.groupby("feature_probability", sort=False):
        held = g[g["norm"] > 0.5]
        for frac in ELHAGE_FRACTIONS:
            near = held[(held["dimensionality"] - float(frac)).abs() <= tolerance]
            rows.append({"feature_probability": p, "fraction": str(frac), "features": len(near),
                         "seeds_with_it": int(near["seed"].nunique()), "seeds": seeds,
                         "represented": len(held), "dims_per_feature": float(dims_per_feature[p])})
    return pd.DataFrame(rows)

