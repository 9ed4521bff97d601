"""moetrace.significance against SciPy: exact permutation tests, the binomial (McNemar) test and
the paired percentile bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace.significance import PairedBootstrap, combined_effect, paired_effect, ratio, sign_flip_p_value


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(2, 9), weighted=st.booleans())
def test_sign_flip_equals_scipys_exact_paired_permutation_test(seed, n, weighted):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=n), rng.normal(size=n) + rng.normal()
    w = rng.uniform(0.5, 3.0, size=n) if weighted else np.ones(n)

    def statistic(a, b, axis=-1):
        return np.sum(w * (a - b), axis=axis)

    ref = scipy.stats.permutation_test((x, y), statistic, permutation_type="samples", vectorized=True,
                                       n_resamples=np.inf, alternative="two-sided").pvalue
    assert sign_flip_p_value(x - y, w) == pytest.approx(ref, rel=1e-9, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 60))
def test_mcnemar_is_the_exact_sign_flip_test_on_binary_outcomes(seed, n):
    """For 0/1 outcomes McNemar's exact test is the sign-flip test (only discordant items flip)."""
    rng = np.random.default_rng(seed)
    a = rng.random(n) < 0.7
    b = np.where(rng.random(n) < 0.8, a, ~a)
    effect = paired_effect(a, b)
    assert effect.test == "mcnemar_exact"
    discordant = int(np.count_nonzero(a != b))
    if discordant <= 16:
        assert effect.p_value == pytest.approx(sign_flip_p_value(a.astype(float) - b.astype(float)), rel=1e-9)
    gained, lost = int(np.sum(a & ~b)), int(np.sum(~a & b))
    expected = 1.0 if gained + lost == 0 else scipy.stats.binomtest(gained, gained + lost, 0.5).pvalue
    assert effect.p_value == pytest.approx(expected)
    assert effect.estimate == pytest.approx(a.mean() - b.mean())


def test_monte_carlo_sign_flip_agrees_with_the_exact_test():
    rng = np.random.default_rng(3)
    d = rng.normal(0.3, 1.0, size=40)
    exact_like = scipy.stats.permutation_test((d, np.zeros_like(d)), lambda a, b, axis=-1: np.sum(a - b, axis=axis),
                                              permutation_type="samples", vectorized=True, n_resamples=200_000,
                                              alternative="two-sided", random_state=1).pvalue
    assert sign_flip_p_value(d, n_perm=50_000, seed=2) == pytest.approx(exact_like, abs=0.01)


@pytest.mark.parametrize("binary", [True, False])
def test_paired_bootstrap_interval_matches_scipy(binary):
    rng = np.random.default_rng(11)
    n = 200
    if binary:
        a = rng.random(n) < 0.8
        b = np.where(rng.random(n) < 0.85, a, rng.random(n) < 0.5)
    else:
        a, b = rng.gamma(2.0, size=n), rng.gamma(2.0, size=n)
    effect = paired_effect(a, b, boot=PairedBootstrap({"g": n}, n_boot=20_000, seed=0), name="g")
    ref = scipy.stats.bootstrap((a.astype(float), b.astype(float)), lambda x, y, axis=-1: np.mean(x - y, axis=axis),
                                paired=True, vectorized=True, n_resamples=20_000, method="percentile",
                                confidence_level=0.95, random_state=0).confidence_interval
    # Monte Carlo error of a 2.5% quantile of 20,000 draws, plus one lattice step of a mean of
    # n 0/1 differences (the bootstrap means of binary data sit on multiples of 1/n)
    tol = 0.15 * np.std(a.astype(float) - b.astype(float)) / np.sqrt(n) + (1.0 / n if binary else 0.0)
    assert effect.ci_low == pytest.approx(ref.low, abs=tol)
    assert effect.ci_high == pytest.approx(ref.high, abs=tol)
    assert effect.ci_low <= effect.estimate <= effect.ci_high


def test_weighted_effect_is_the_token_weighted_group_difference():
    rng = np.random.default_rng(5)
    tokens = rng.integers(3, 30, size=50).astype(float)
    base, ablated = rng.uniform(1, 3, 50), rng.uniform(1, 4, 50)
    effect = paired_effect(ablated, base, tokens)
    assert effect.test == "sign_flip_permutation"
    assert effect.estimate == pytest.approx((ablated * tokens).sum() / tokens.sum() - (base * tokens).sum() / tokens.sum())


def test_combined_effect_of_one_cell_is_the_paired_effect():
    rng = np.random.default_rng(8)
    a, b = rng.normal(1, 1, 30), rng.normal(0, 1, 30)
    boot = PairedBootstrap({"g": 30}, n_boot=3000, seed=4)
    one = paired_effect(a, b, boot=boot, name="g")
    combined, draws = combined_effect([("g", 1.0, a - b, None)], boot)
    assert (combined.estimate, combined.ci_low, combined.ci_high) == pytest.approx((one.estimate, one.ci_low, one.ci_high))
    assert combined.p_value == pytest.approx(one.p_value, abs=0.02)  # both Monte Carlo over 2^30 patterns
    assert draws.shape == (3000,)


def test_mean_of_two_groups_resamples_each_group_with_its_own_items():
    rng = np.random.default_rng(9)
    d1, d2 = rng.normal(1, 1, 20), rng.normal(3, 1, 40)
    boot = PairedBootstrap({"a": 20, "b": 40}, n_boot=2000, seed=0)
    eff, draws = combined_effect([("a", 0.5, d1, None), ("b", 0.5, d2, None)], boot)
    assert eff.estimate == pytest.approx((d1.mean() + d2.mean()) / 2)
    np.testing.assert_allclose(draws, 0.5 * boot.means("a", d1) + 0.5 * boot.means("b", d2))
    assert eff.n == 60


def test_ratio_is_undefined_when_the_denominator_interval_contains_zero():
    rng = np.random.default_rng(1)
    num, den = rng.normal(1.0, 0.05, 1000), rng.normal(0.01, 0.05, 1000)
    r = ratio(num, den, 1.0, 0.01)
    assert not r.defined and np.isnan(r.estimate) and np.isnan(r.ci_low)
    r = ratio(num, rng.normal(0.5, 0.05, 1000), 1.0, 0.5)
    assert r.defined and r.estimate == pytest.approx(2.0) and r.ci_low < 2.0 < r.ci_high


def test_no_discordant_items_means_no_evidence():
    a = np.array([True, False, True])
    effect = paired_effect(a, a.copy())
    assert effect.estimate == 0 and effect.p_value == 1.0 and effect.ci_low == effect.ci_high == 0


# ----------------------------------------------------------------------------- targeted vs random draws


def _slow_pooled_p(cells) -> float:
    """The pooled rank test by brute force: every choice of one value per group from {targeted,
    draws...} (itertools.product), counting those whose mean reaches the targeted mean."""
    import itertools

    values = [[float(np.mean(t))] + [float(np.mean(row)) for row in r] for t, r in cells]
    observed = np.mean([v[0] for v in values])
    combos = list(itertools.product(*values))
    return sum(np.mean(c) >= observed - 1e-12 for c in combos) / len(combos)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n_groups=st.integers(1, 3), n_draws=st.integers(1, 6),
       n_items=st.integers(1, 8), binary=st.booleans())
def test_draw_rank_p_value_equals_brute_force(seed, n_groups, n_draws, n_items, binary):
    from moetrace.significance import pooled_targeted_vs_random, targeted_vs_random

    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_groups):
        shape = (n_draws + 1, n_items)
        values = rng.integers(0, 2, shape).astype(float) if binary else rng.normal(size=shape)
        cells.append((values[0], values[1:]))
    test = pooled_targeted_vs_random([(t, r, None) for t, r in cells], n_boot=50, seed=seed)
    assert test.p_value == pytest.approx(_slow_pooled_p(cells))
    assert test.p_min == pytest.approx((n_draws + 1) ** -n_groups)
    assert test.n_random == n_draws
    t, r = cells[0]
    single = targeted_vs_random(t, r, n_boot=50)
    # the formula: (1 + #{draws with effect >= targeted}) / (N + 1)
    assert single.p_value == pytest.approx((1 + np.sum(r.mean(axis=1) >= t.mean() - 1e-12)) / (n_draws + 1))
    assert single.estimate == pytest.approx(t.mean() - r.mean())


def test_two_level_interval_includes_the_draw_to_draw_variance():
    """With noiseless items the item-level interval would be a point; draws that differ widen the
    two-level interval to about the sd of the draws' mean, and it covers the estimate."""
    from moetrace.significance import targeted_vs_random

    rng = np.random.default_rng(0)
    draw_effects = rng.normal(0.1, 0.05, 40)
    randoms = np.repeat(draw_effects[:, None], 100, axis=1)  # every item of a draw has the draw's effect
    test = targeted_vs_random(np.full(100, 0.3), randoms, n_boot=4000)
    assert test.estimate == pytest.approx(0.3 - draw_effects.mean())
    assert test.ci_low < test.estimate < test.ci_high
    se = draw_effects.std(ddof=1) / np.sqrt(40)
    assert (test.ci_high - test.ci_low) / (2 * 1.96) == pytest.approx(se, rel=0.2)
    assert test.p_value == pytest.approx(1 / 41)  # above every draw
    weighted = targeted_vs_random(np.full(100, 0.3), randoms, weights=rng.uniform(1, 5, 100), n_boot=100)
    assert weighted.estimate == pytest.approx(test.estimate)


def test_draw_test_refuses_mismatched_items():
    from moetrace.significance import targeted_vs_random

    with pytest.raises(ValueError, match="same items"):
        targeted_vs_random(np.zeros(5), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="finite"):
        targeted_vs_random(np.array([0.0, np.nan]), np.zeros((3, 2)))


def test_holm_by_hand():
    from moetrace.significance import holm

    # sorted 0.01, 0.02, 0.04 with m = 3: 0.03, 0.04, 0.04 (monotone), NaN left alone
    np.testing.assert_allclose(holm([0.04, 0.01, np.nan, 0.02]), [0.04, 0.03, np.nan, 0.04])
    assert holm([0.6, 0.5]).tolist() == [1.0, 1.0]


def test_draw_test_is_calibrated_under_the_null_and_the_old_test_is_not():
    """1,000 simulated experiments in the demo's design where the targets are one more random draw:
    the rank test over draws rejects at most alpha + 2 Monte Carlo standard errors of the time. The
    test it replaced (targeted minus the mean of 2 draws, items resampled only) rejects far more
    often, so the simulation can tell a miscalibrated test (bench/bench_calibration.py has the
    full run and the power)."""
    from moetrace.significance import pooled_targeted_vs_random, simulate_ablation_experiments

    def reject(cells) -> bool:
        return pooled_targeted_vs_random([(t, r, None) for t, r in cells], n_boot=2).p_value <= 0.05

    for kind in ("accuracy", "loss"):  # the demo's draw and item variation (DEMO_NULL)
        flags = [reject(c) for c in simulate_ablation_experiments(1000, kind=kind, seed=11)]
        rate = np.mean(flags)
        assert rate <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / 1000), (kind, rate)

    old = []
    for cells in simulate_ablation_experiments(100, kind="loss", seed=12):
        boot = PairedBootstrap({str(g): len(t) for g, (t, _r) in enumerate(cells)}, n_boot=2, seed=0)
        effect, _ = combined_effect([(str(g), 0.25, t - r[:2].mean(axis=0), None) for g, (t, r) in enumerate(cells)],
                                    boot)
        old.append(effect.p_value <= 0.05)
    assert np.mean(old) > 0.2


def test_simulated_power_grows_with_the_effect():
    from moetrace.significance import pooled_targeted_vs_random, simulate_ablation_experiments

    def power(extra):
        return np.mean([pooled_targeted_vs_random([(t, r, None) for t, r in c], n_boot=2).p_value <= 0.05
                        for c in simulate_ablation_experiments(100, kind="loss", mean_harm=0.15, draw_sd=0.05,
                                                               item_sd=0.5, extra_harm=extra, seed=5)])

    assert power(0.0) < power(0.05) < power(0.2)
    assert power(0.2) > 0.9
