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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

__all__ = ["Effect", "PairedBootstrap", "Ratio", "combined_effect", "paired_effect", "ratio", "sign_flip_p_value"]

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
