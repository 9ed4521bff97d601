"""Paired statistics for ablation effects: 95% intervals and p-values over evaluation items.

An ablation is evaluated on the same items (questions, texts) as the unablated model, so every
effect is a *paired* difference: item i contributes ``d_i = a_i - b_i`` with weight ``w_i``
(1 for a question; its number of scored tokens for a text, so that the effect on a group's
token-weighted loss is ``sum(w d) / sum(w)``). Two tools, both exact about the pairing:

- **Interval: paired percentile bootstrap over items.** Items are resampled with replacement
  (``n_boot`` draws); an effect that combines several cells evaluated on the same group's items
  (a targeted effect next to an off-target one, a ratio of the two) reuses the same draws of
  those items in every cell, so correlations between cells are kept. No normality is assumed,
  which matters for accuracy differences of a few questions. ``PairedBootstrap`` holds the draws.
- **p-value: paired sign-flip permutation test.** Under "the ablation changes nothing" the two
  measurements of an item are exchangeable, so flipping the sign of ``d_i`` leaves the
  distribution unchanged; the p-value is the share of flips whose ``|sum(w d s)|`` reaches the
  observed one (exact enumeration up to 2^16 flips, else Monte Carlo with the +1 correction, which
  keeps the test valid). For 0/1 outcomes with unit weights this test is McNemar's exact test
  (only discordant items can change sign), computed as the binomial test on the discordant
  pairs, ``scipy.stats.binomtest(b, b + c, 0.5)``.

The p-value of a *difference between two ablations* on the same items (targeted minus the
random control's mean over seeds) uses the same sign-flip test; there the two terms of an item are
not exchangeable draws of one 0/1 outcome, so with few items the test is approximate (with many
items the mean difference is close to symmetric and it is accurate).

A ratio (selectivity: targeted effect / off-target effect) gets an interval only; when the
interval of its denominator contains 0 the ratio is undefined and reported as such (``NaN`` with
``defined=False``), never as ``inf``.

**Targeted versus random draws** (:func:`targeted_vs_random`, :func:`pooled_targeted_vs_random`).
Whether a targeted ablation hurts more than ablating random routes has two sources of variance:
the items (the same items are evaluated under every ablation) and the draws (two random sets of
the same size hurt by different amounts). The sign-flip test above sees only the first; with the
mean of a few draws taken as fixed it rejects a true null far more often than its level
(``bench/bench_calibration.py``). So the headline test is over draws:

- **p-value: rank of the targeted effect among the draws.** With N random draws evaluated on the
  same items, ``p = (1 + #{draws whose effect >= the targeted effect}) / (N + 1)``: exact when the
  targets are exchangeable with the draws (one-sided: "the targets hurt more"). It can never be
  below ``1 / (N + 1)``. Pooled over several targeted groups (each with its own targets and
  draws), the statistic is the mean over groups and the null distribution is that of the mean
  when each group's targeted effect is put in turn in the place of each of its draws: all
  ``prod_g (N_g + 1)`` combinations (enumerated exactly, by convolution of the per-group value
  lists), so p can reach ``1 / prod_g (N_g + 1)``.
- **Interval: two-level bootstrap.** Each bootstrap replicate resamples the draws (with
  replacement), then the items (with replacement, the same items for the targets and every
  draw: the pairing is kept), and recomputes ``targeted - mean over draws``. The percentile
  interval of these replicates includes both variances.

The targeted effect's own item-level interval (the paired bootstrap above) is reported beside it.
Multiplicity: :func:`holm` adjusts a family of p-values (Holm's step-down method, which controls
the family-wise error rate under any dependence).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

__all__ = ["DrawTest", "Effect", "PairedBootstrap", "Ratio", "combined_effect", "holm", "paired_effect",
           "pooled_targeted_vs_random", "ratio", "sign_flip_p_value", "simulate_ablation_experiments", "DEMO_NULL",
           "targeted_vs_random"]

LEVEL = 0.95


@dataclass(frozen=True)
class Effect:
    """A paired effect: ``estimate`` with its ``LEVEL`` interval [``ci_low``, ``ci_high``], the
    two-sided ``p_value`` of "no effect", ``n`` items, and the ``test`` that gave the p-value."""

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    test: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Ratio:
    """``numerator / denominator`` of two effects with a bootstrap interval; ``defined`` is False
    (and every number NaN) when the denominator's interval contains 0."""

    estimate: float
    ci_low: float
    ci_high: float
    defined: bool

    def as_dict(self) -> dict:
        return asdict(self)


def _weighted_mean(d: np.ndarray, w: np.ndarray) -> float:
    total = float(w.sum())
    return float((d * w).sum() / total) if total > 0 else float("nan")


def sign_flip_p_value(d: np.ndarray, w: np.ndarray | None = None, *, n_perm: int = 20000, seed: int = 0) -> float:
    """Two-sided paired sign-flip permutation p-value of ``sum(w * d)`` against 0.

    d: float [n] paired differences; w: float [n] non-negative weights (default 1). Exact over
    all 2^m sign patterns of the m non-zero terms when m <= 16, else Monte Carlo with ``n_perm``
    random patterns and p = (1 + hits) / (1 + n_perm).
    """
    d = np.asarray(d, dtype=np.float64)
    w = np.ones_like(d) if w is None else np.asarray(w, dtype=np.float64)
    terms = d * w
    terms = terms[terms != 0]
    m = terms.size
    if m == 0:
        return 1.0
    observed = abs(terms.sum())
    # a flip can only tie the observed sum up to rounding: compare with a relative tolerance
    tol = 1e-9 * max(1.0, float(np.abs(terms).sum()))
    if m <= 16:
        patterns = ((np.arange(2 ** m)[:, None] >> np.arange(m)) & 1) * 2 - 1
        sums = np.abs(patterns @ terms)
        return float(np.mean(sums >= observed - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_perm, 2000):
        k = min(2000, n_perm - start)
        signs = rng.integers(0, 2, size=(k, m), dtype=np.int8) * 2 - 1
        hits += int(np.count_nonzero(np.abs(signs @ terms) >= observed - tol))
    return (1 + hits) / (1 + n_perm)


def _mcnemar_p_value(a: np.ndarray, b: np.ndarray) -> float:
    """McNemar's exact test for paired 0/1 outcomes: binomial test on the discordant pairs."""
    from scipy.stats import binomtest

    gained = int(np.count_nonzero(a & ~b))
    lost = int(np.count_nonzero(~a & b))
    if gained + lost == 0:
        return 1.0
    return float(binomtest(gained, gained + lost, 0.5).pvalue)


class PairedBootstrap:
    """Bootstrap draws of item indices per item set (e.g. per evaluated group), shared by every
    effect computed on that set.

    sizes: {set name: number of items}; ``n_boot`` draws of ``n`` indices with replacement each,
    from ``numpy.random.default_rng(seed)`` in sorted set order (deterministic).
    """

    def __init__(self, sizes: Mapping[str, int], *, n_boot: int = 4000, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.n_boot = n_boot
        self._idx = {name: rng.integers(0, n, size=(n_boot, n), dtype=np.int32) if n
                     else np.zeros((n_boot, 0), np.int32) for name, n in sorted(sizes.items())}

    def means(self, name: str, d: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
        """float64 [n_boot]: the weighted mean of ``d`` over each draw of set ``name``'s items."""
        idx = self._idx[name]
        d = np.asarray(d, dtype=np.float64)
        if d.shape[0] != idx.shape[1]:
            raise ValueError(f"{name}: expected {idx.shape[1]} items, got {d.shape[0]}")
        if w is None:
            return d[idx].mean(axis=1) if d.size else np.full(self.n_boot, np.nan)
        w = np.asarray(w, dtype=np.float64)
        ws = w[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (d * w)[idx].sum(axis=1) / ws

    @staticmethod
    def interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
        """Percentile interval of bootstrap draws (NaN draws left out; NaN if none is left)."""
        draws = np.asarray(draws, dtype=np.float64)
        draws = draws[np.isfinite(draws)]
        if draws.size == 0:
            return float("nan"), float("nan")
        alpha = (1 - level) / 2
        lo, hi = np.quantile(draws, [alpha, 1 - alpha])
        return float(lo), float(hi)


def paired_effect(a: np.ndarray, b: np.ndarray, w: np.ndarray | None = None, *, boot: PairedBootstrap | None = None,
                  name: str = "items", seed: int = 0) -> Effect:
    """The paired effect ``mean_w(a - b)`` of one item set, with interval and p-value.

    a, b: [n] measurements of the same items (bool or 0/1 for correctness: McNemar's exact test;
    numbers otherwise: the sign-flip test); w: [n] weights (default 1). boot: shared draws (a
    private ``PairedBootstrap(seed=seed)`` when None) with the items under ``name``.
    """
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise ValueError(f"a, b: expected two [n] arrays of the same items, got {a_arr.shape} and {b_arr.shape}")
    n = a_arr.shape[0]
    d = a_arr.astype(np.float64) - b_arr.astype(np.float64)
    weights = None if w is None else np.asarray(w, dtype=np.float64)
    if boot is None:
        boot = PairedBootstrap({name: n}, seed=seed)
    estimate = _weighted_mean(d, np.ones(n) if weights is None else weights)
    lo, hi = boot.interval(boot.means(name, d, weights))
    binary = weights is None and a_arr.dtype == bool and b_arr.dtype == bool
    if binary:
        p, test = _mcnemar_p_value(a_arr, b_arr), "mcnemar_exact"
    else:
        p, test = sign_flip_p_value(d, weights, seed=seed), "sign_flip_permutation"
    return Effect(estimate, lo, hi, p, n, test)


def ratio(num_draws: np.ndarray, den_draws: np.ndarray, num: float, den: float) -> Ratio:
    """``num / den`` with the percentile interval of the draw-wise ratios; undefined when the
    denominator's own interval contains 0 (or any input is NaN)."""
    den_lo, den_hi = PairedBootstrap.interval(den_draws)
    if any(math.isnan(x) for x in (num, den, den_lo, den_hi)) or den_lo <= 0 <= den_hi:
        return Ratio(float("nan"), float("nan"), float("nan"), False)
    with np.errstate(invalid="ignore", divide="ignore"):
        lo, hi = PairedBootstrap.interval(np.asarray(num_draws) / np.asarray(den_draws))
    return Ratio(num / den, lo, hi, True)


Cell = tuple  # (item set name, coefficient, d [n], w [n] or None)


def combined_effect(cells: list[Cell], boot: PairedBootstrap, *, seed: int = 0) -> tuple[Effect, np.ndarray]:
    """A linear combination of paired cell effects, ``sum_c coef_c * mean_w(d_c)``, with interval and p-value.

    cells: ``(set name, coef, d, w)``: the items of set ``name`` (e.g. an evaluated group), their
    paired differences ``d`` [n] and weights ``w`` [n] (None: 1). Cells on the same set share the
    bootstrap draws, and for the p-value each item's contributions to every cell are summed into
    one term before its sign is flipped (items, not cells, are exchangeable). Returns the Effect
    (``n`` = distinct items) and the bootstrap draws [n_boot] (for ratios).
    """
    draws = np.zeros(boot.n_boot)
    estimate = 0.0
    terms: dict[str, np.ndarray] = {}
    for name, coef, d, w in cells:
        d = np.asarray(d, dtype=np.float64)
        w = np.ones_like(d) if w is None else np.asarray(w, dtype=np.float64)
        estimate += coef * _weighted_mean(d, w)
        draws = draws + coef * boot.means(name, d, w)
        share = coef * w / w.sum() if w.sum() > 0 else np.zeros_like(w)
        terms[name] = terms.get(name, 0.0) + share * d
    if not cells:
        return Effect(float("nan"), float("nan"), float("nan"), float("nan"), 0, "sign_flip_permutation"), draws
    lo, hi = boot.interval(draws)
    all_terms = np.concatenate([np.atleast_1d(t) for t in terms.values()])
    p = sign_flip_p_value(all_terms, seed=seed)
    return Effect(float(estimate), lo, hi, p, int(all_terms.size), "sign_flip_permutation"), draws


@dataclass(frozen=True)
class DrawTest:
    """Targeted effect minus the mean random draw's effect (module docstring).

    ``estimate`` with its two-level bootstrap ``LEVEL`` interval [``ci_low``, ``ci_high``], the
    one-sided ``p_value`` of the rank test over draws (``p_min`` is the smallest p the design can
    give), ``n_random`` draws (per group, the smallest when pooled), ``n`` items, the ``targeted``
    and mean ``random`` effects (the latter with its two-level interval), and the ``test`` name.
    """

    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    p_min: float
    n_random: int
    n: int
    targeted: float
    random: float
    random_ci_low: float
    random_ci_high: float
    test: str = "rank_over_draws"

    def as_dict(self) -> dict:
        return asdict(self)


def _draw_cell(targeted, randoms, weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.asarray(targeted, dtype=np.float64)
    r = np.asarray(randoms, dtype=np.float64)
    if t.ndim != 1 or r.ndim != 2 or r.shape[1] != t.shape[0]:
        raise ValueError(f"targeted, randoms: expected [n_items] and [n_draws, n_items] arrays of the same items, "
                         f"got {t.shape} and {r.shape}")
    if r.shape[0] < 1 or t.shape[0] < 1:
        raise ValueError(f"randoms: expected at least one draw and one item, got {r.shape}")
    w = np.ones_like(t) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != t.shape or not np.all(w >= 0) or w.sum() <= 0:
        raise ValueError(f"weights: expected {t.shape[0]} non-negative weights with a positive sum, got {w.shape}")
    if not (np.isfinite(t).all() and np.isfinite(r).all()):
        raise ValueError("targeted, randoms: expected finite per-item effects")
    return t, r, w


def _null_tail(values: list[np.ndarray], observed: float) -> float:
    """P(mean over groups of one value drawn uniformly from each group's list >= observed), exactly.

    Enumerates the product of the lists by merging sums (each list has N_g + 1 values)."""
    sums = np.zeros(1)
    for v in values:
        sums = (sums[:, None] + v[None, :]).ravel()
        if sums.size > 2_000_000:  # keep the enumeration bounded: fall back to Monte Carlo below
            break
    else:
        tol = 1e-12 * max(1.0, float(np.abs(sums).max()))
        return float(np.mean(sums / len(values) >= observed - tol))
    rng = np.random.default_rng(0)
    draws = 200_000
    total = sum(v[rng.integers(0, v.size, draws)] for v in values) / len(values)
    return float((1 + np.count_nonzero(total >= observed - 1e-12)) / (1 + draws))


def pooled_targeted_vs_random(cells, *, seed: int = 0, n_boot: int = 2000) -> DrawTest:
    """:func:`targeted_vs_random` pooled over targeted groups: equal-weight mean over ``cells``.

    cells: list of ``(targeted [n_g], randoms [N_g, n_g], weights [n_g] or None)``, one per
    targeted group (each on its own items). The p-value enumerates every combination of one
    value per group from ``{targeted effect, draw effects}`` (module docstring); the interval
    resamples draws and items within each group independently.
    """
    if not cells:
        raise ValueError("cells: expected at least one targeted group")
    rng = np.random.default_rng(seed)
    prepared = [_draw_cell(t, r, w) for t, r, w in cells]
    t_means, r_means, boot, r_boot_total = [], [], np.zeros(n_boot), np.zeros(n_boot)
    per_group_values = []
    for t, r, w in prepared:
        n, n_draws = t.shape[0], r.shape[0]
        tm = float((t * w).sum() / w.sum())
        rm = (r * w).sum(axis=1) / w.sum()  # [N]: each draw's weighted mean effect
        t_means.append(tm)
        r_means.append(float(rm.mean()))
        per_group_values.append(np.concatenate([[tm], rm]))
        item_counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).T * w[:, None]  # [n, B]
        draw_counts = rng.multinomial(n_draws, np.full(n_draws, 1.0 / n_draws), size=n_boot)  # [B, N]
        denominators = item_counts.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            t_boot = (t @ item_counts) / denominators
            r_boot = (r @ item_counts) / denominators  # [N, B]
        mean_draw = (draw_counts * r_boot.T).sum(axis=1) / n_draws
        boot += t_boot - mean_draw
        r_boot_total += mean_draw
    k = len(prepared)
    observed = float(np.mean(t_means))
    lo, hi = PairedBootstrap.interval(boot / k)
    r_lo, r_hi = PairedBootstrap.interval(r_boot_total / k)
    p = _null_tail(per_group_values, observed)
    p_min = 1.0 / float(np.prod([v.size for v in per_group_values], dtype=np.float64))
    return DrawTest(estimate=observed - float(np.mean(r_means)), ci_low=lo, ci_high=hi, p_value=p, p_min=p_min,
                    n_random=int(min(r.shape[0] for _, r, _ in prepared)), n=int(sum(t.shape[0] for t, _, _ in prepared)),
                    targeted=observed, random=float(np.mean(r_means)), random_ci_low=r_lo, random_ci_high=r_hi,
                    test="rank_over_draws" if k == 1 else "rank_over_draws_pooled")


def targeted_vs_random(targeted, randoms, *, weights=None, seed: int = 0, n_boot: int = 2000) -> DrawTest:
    """Does the targeted ablation hurt more than random draws of the same size? (module docstring)

    targeted: float [n_items], the per-item effect of the targeted ablation (ablated minus base,
    oriented so that larger means more harm: an accuracy drop, a loss increase); randoms: float
    [n_draws, n_items], the same items under each random draw; weights: [n_items] (e.g. scored
    tokens per text; default 1). Returns a :class:`DrawTest`: ``estimate`` = weighted mean of
    ``targeted`` minus the mean over draws of their weighted means, its two-level bootstrap
    interval, ``p_value = (1 + #{draws with effect >= targeted}) / (n_draws + 1)`` and ``n_random``.
    """
    return pooled_targeted_vs_random([(targeted, randoms, weights)], seed=seed, n_boot=n_boot)


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (same order; NaN stays NaN and does not count in the family)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = adjusted
    return out


# The demo's random draws as measured (bench/RESULTS.md, issue 19): per targeted domain, the mean
# effect of a draw and its draw-to-draw sd (accuracy: 0.002-0.020 and 0.002-0.018; loss, nats per
# token: 0.10-0.18 and 0.07-0.30, for experts), the sd of one text's loss effect within a draw
# (median 0.05, 75th percentile 0.12) and base accuracy 1.0 (answer scoring).
DEMO_NULL = {
    "accuracy": {"mean_harm": 0.01, "draw_sd": 0.01, "base_accuracy": 0.98},
    "loss": {"mean_harm": 0.14, "draw_sd": 0.14, "item_sd": 0.07},
}


def simulate_ablation_experiments(n_experiments: int, *, n_groups: int = 4, n_items: int = 200, n_draws: int = 20,
                                  kind: str = "accuracy", base_accuracy: float | None = None,
                                  mean_harm: float | None = None, draw_sd: float | None = None,
                                  item_sd: float | None = None, extra_harm: float = 0.0, seed: int = 0):
    """Simulated ablation experiments, to measure what a test does under the null and its power.

    Yields ``n_experiments`` lists of ``n_groups`` cells ``(targeted [n_items], randoms [n_draws,
    n_items])`` of per-item harm (an accuracy drop or a loss increase). Every ablation (each
    random draw and the targets) has its own harm ``h = mean_harm + draw_sd * z`` (draws differ
    from each other, as in the demo); the targets get ``extra_harm`` on top (0: the null, where
    the targets are exchangeable with the draws). Items differ in how easily an ablation hurts
    them (a susceptibility ``s_i`` shared by every ablation, mean 1), so item effects are
    correlated across ablations as they are in a real model.

    kind ``"accuracy"``: item i is correct at base with probability ``base_accuracy``; an ablation
    with harm h makes a correct item wrong with probability ``clip(h * s_i, 0, 1)``; the per-item
    harm is base - ablated (0/1). kind ``"loss"``: the per-item harm is ``h * s_i + item_sd * e``
    with standard normal e. Parameters left None take the demo's measured values (``DEMO_NULL``).
    """
    if kind not in ("accuracy", "loss"):
        raise ValueError(f"kind: expected 'accuracy' or 'loss', got {kind!r}")
    demo = {"base_accuracy": 0.98, "item_sd": 0.07, **DEMO_NULL[kind]}
    base_accuracy = demo["base_accuracy"] if base_accuracy is None else base_accuracy
    mean_harm = demo["mean_harm"] if mean_harm is None else mean_harm
    draw_sd = demo["draw_sd"] if draw_sd is None else draw_sd
    item_sd = demo["item_sd"] if item_sd is None else item_sd
    rng = np.random.default_rng(seed)
    for _ in range(n_experiments):
        cells = []
        for _g in range(n_groups):
            s = rng.gamma(2.0, 0.5, n_items)  # susceptibility, mean 1
            h = mean_harm + draw_sd * rng.standard_normal(n_draws + 1)
            h[0] += extra_harm
            if kind == "accuracy":
                correct = rng.random(n_items) < base_accuracy
                flips = rng.random((n_draws + 1, n_items)) < np.clip(h[:, None] * s[None, :], 0.0, 1.0)
                harm = (correct[None, :] & flips).astype(np.float64)
            else:
                harm = h[:, None] * s[None, :] + item_sd * rng.standard_normal((n_draws + 1, n_items))
            cells.append((harm[0], harm[1:]))
        yield cells
