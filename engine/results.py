"""The experiment's results: its per-item table and the headline numbers drawn from it.

Shared by :mod:`moetrace.experiment`, which writes ``results.csv`` / ``items.csv`` /
``summary.json``, and :mod:`moetrace.report`, which reads them: :func:`summarize` turns a results
table (and the per-item table) into the headline per method and measure, :func:`summary_lines`
prints it.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from moetrace.significance import PairedBootstrap, combined_effect, holm, pooled_targeted_vs_random, ratio

# measure -> (items.csv kind, what one item's value is). Every measure is oriented so that a
# positive effect is harm: an accuracy drop is base - ablated, a loss increase ablated - base.
MEASURES = {
    "drop": "question",
    "loss_increase": "text",
    "answer_loss_increase": "text_answer",
    "other_loss_increase": "text_other",
}
# The measures whose targeted-vs-random test is primary (Holm-adjusted together, over methods).
PRIMARY_MEASURES = ("drop", "loss_increase")
N_BOOT = 2000  # bootstrap resamples of every interval

# OUT/items.csv: one row per evaluated item per variant (the paired data every interval comes from).
# kind "question": base/ablated = 1 if answered correctly, weight 1; kind "text": the text's mean
# next-token loss, weight = its scored tokens; "text_answer" / "text_other": the same over the
# text's answer tokens / its other tokens.
ITEM_COLUMNS = ("kind", "method", "targeted_group", "seed", "evaluated_group", "item", "base", "ablated", "weight")


def item_harm(kind: str, base: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """Per-item effect oriented as harm: base - ablated for correctness, ablated - base for losses."""
    return base - ablated if kind == "question" else ablated - base


def summarize(table: Mapping[str, np.ndarray], items: Mapping[str, np.ndarray] | None = None, *, seed: int = 0,
              n_boot: int = N_BOOT, testable: set | None = None) -> dict[str, Any]:
    """Headline numbers per method and measure from a results table (and the per-item table).

    Returns ``{method: {measure: entry}, "primary_tests": [...]}``. For a measure x of
    ``MEASURES`` measured in the table, ``entry`` holds ``groups`` (the targeted groups it
    averages over: for accuracy only the ``testable`` ones when given, the others listed in
    ``not_testable``), and: ``targeted`` (mean over those groups of x on the group),
    ``off_target`` (of the mean x on the other such groups), ``random`` (of the mean over its
    draws of x on the group), ``targeted_minus_random`` and ``selectivity`` (targeted /
    off-target). From the table alone these are ``{"estimate": ...}``; with ``items`` (the
    per-item table, ``ITEM_COLUMNS``) they carry intervals: the targeted and off-target effects a
    95% paired bootstrap over items with a sign-flip/McNemar p-value, ``targeted_minus_random``
    the draw test (``moetrace.significance.pooled_targeted_vs_random``: rank p over the draws,
    two-level bootstrap interval, ``n_random``), ``random`` that test's interval of the mean
    draw, and ``per_group`` the same test per targeted group. ``coverage`` gives the mean
    coverage of the targeted group's routes by the targets and by the draws and the share of
    draws inside the band.

    ``primary_tests`` lists the targeted-vs-random test of every method on ``PRIMARY_MEASURES``
    with its Holm-adjusted p-value (also set as ``p_holm`` in that entry's
    ``targeted_minus_random``, with ``primary: true``).
    """
    import pandas as pd

    df = pd.DataFrame({c: np.asarray(v) for c, v in table.items() if np.asarray(v).ndim == 1})
    df["method"], df["targeted_group"], df["evaluated_group"] = (df[c].astype(str) for c in
                                                                 ("method", "targeted_group", "evaluated_group"))
    item_df = None
    if items is not None and len(np.asarray(items["kind"])):
        item_df = pd.DataFrame({c: np.asarray(items[c]) for c in ITEM_COLUMNS})
        for c in ("kind", "method", "targeted_group", "evaluated_group"):
            item_df[c] = item_df[c].astype(str)
    out: dict[str, Any] = {}
    for method in sorted({m for m in df["method"] if not m.startswith("random:")}):
        entry: dict[str, Any] = {}
        rows = df["method"] == method
        nothing_ablated = "n_items" in df and bool((df.loc[rows, "n_items"] == 0).all())
        for measure, kind in MEASURES.items():
            if measure not in df:
                continue
            # a method that ablated nothing anywhere still gets its accuracy (and, with texts, loss) entry:
            # its headline row then says "no targets", not nothing at all
            base_measured = measure == "drop" or (measure == "loss_increase" and "base_loss" in df
                                                  and df["base_loss"].notna().any())
            if not df.loc[rows, measure].notna().any() and not (nothing_ablated and base_measured):
                continue
            entry[measure] = _measure_entry(df, item_df, method, measure, kind, testable, seed, n_boot)
        out[method] = entry
    primary = [(m, x) for m in out for x in PRIMARY_MEASURES if x in out[m]
               and "p_value" in out[m][x]["targeted_minus_random"]]
    adjusted = holm([out[m][x]["targeted_minus_random"]["p_value"] for m, x in primary])
    out["primary_tests"] = []
    for (m, x), p_holm in zip(primary, adjusted):
        test = out[m][x]["targeted_minus_random"]
        test.update(p_holm=float(p_holm), primary=True)
        out["primary_tests"].append({"method": m, "measure": x, "p_value": test["p_value"], "p_holm": float(p_holm),
                                     "n_random": test["n_random"]})
    return out


def _measure_entry(df, item_df, method: str, measure: str, kind: str, testable: set | None, seed: int,
                   n_boot: int) -> dict[str, Any]:
    """One method's headline for one measure (see :func:`summarize`)."""
    real, rand = df[df["method"] == method], df[df["method"] == f"random:{method}"]
    rand = rand[rand["targeted_group"] == rand["evaluated_group"]]  # a draw's effect on its targeted group
    groups = sorted(g for g in set(real["targeted_group"]) if real.loc[real["targeted_group"] == g, measure].notna().any())
    entry: dict[str, Any] = {"groups": groups}
    if "n_items" in real:  # groups where no item reached the threshold: nothing was ablated for them
        own_rows = real[real["targeted_group"] == real["evaluated_group"]]
        entry["no_targets"] = sorted(set(own_rows.loc[own_rows["n_items"] == 0, "targeted_group"]))
    if measure == "drop" and testable is not None:
        entry["not_testable"] = [g for g in groups if g not in testable]
        groups = entry["groups"] = [g for g in groups if g in testable]
    own = real[real["targeted_group"] == real["evaluated_group"]]
    cov = {"targets": float(own[own["targeted_group"].isin(groups)]["target_coverage"].mean())
           if "target_coverage" in own and groups else float("nan")}
    if not rand.empty and "coverage" in rand:
        r = rand[rand["targeted_group"].isin(groups)]
        cov["random"] = float(r["coverage"].mean()) if len(r) else float("nan")
        cov["in_band"] = float(r["in_band"].astype(bool).mean()) if "in_band" in r and len(r) else float("nan")
    entry["coverage"] = cov
    if not groups:
        nan = {"estimate": float("nan")}
        entry.update(targeted=nan, off_target=nan, random=nan, targeted_minus_random={**nan, "n_random": 0},
                     selectivity=nan, per_group={})
        return entry

    def mean_over(frame, pick) -> float:
        values = [pick(frame[frame["targeted_group"] == g]) for g in groups]
        values = [v for v in values if v == v]
        return float(np.mean(values)) if values else float("nan")

    t = mean_over(own, lambda f: f[measure].mean())
    o = mean_over(real[(real["targeted_group"] != real["evaluated_group"]) & real["evaluated_group"].isin(groups)],
                  lambda f: f[measure].mean())
    r = mean_over(rand, lambda f: f[measure].mean()) if not rand.empty else float("nan")
    n_random = int(rand.groupby("targeted_group")["seed"].nunique().min()) if not rand.empty else 0
    entry.update(targeted={"estimate": t}, off_target={"estimate": o}, random={"estimate": r},
                 targeted_minus_random={"estimate": t - r, "n_random": n_random},
                 selectivity={"estimate": t / o if o > 0 else float("nan")}, per_group={})
    if item_df is None:
        return entry

    sub = item_df[item_df["kind"] == kind]
    cells = {key: g.sort_values("item") for key, g in sub.groupby(["method", "targeted_group", "evaluated_group"])}
    boot = PairedBootstrap({str(e): int(g["item"].nunique()) for e, g in sub.groupby("evaluated_group")},
                           n_boot=n_boot, seed=seed)

    def harm(frame) -> tuple[np.ndarray, np.ndarray]:
        return item_harm(kind, frame["base"].to_numpy(), frame["ablated"].to_numpy()), frame["weight"].to_numpy()

    own_cells, off_blocks, draw_cells = [], [], []
    for g in groups:
        if (method, g, g) not in cells:
            continue
        d, w = harm(cells[(method, g, g)])
        own_cells.append((g, d, w))
        others = [(e, *harm(cells[(method, g, e)])) for e in groups if e != g and (method, g, e) in cells]
        if others:
            off_blocks.append(others)
        if (f"random:{method}", g, g) in cells and w.sum() > 0:  # e.g. no answer tokens in the group's texts
            frame = cells[(f"random:{method}", g, g)]
            wide = frame.pivot(index="seed", columns="item", values="ablated").sort_index()
            base = frame.drop_duplicates("item").set_index("item")["base"].reindex(wide.columns).to_numpy()
            draws = item_harm(kind, base[None, :], wide.to_numpy())
            draw_cells.append((g, d, draws, w))
    # off-target: mean over targeted groups of the mean over the other groups
    off_cells = [(e, 1.0 / (len(off_blocks) * len(block)), d, w) for block in off_blocks for e, d, w in block]
    targeted, t_draws = combined_effect([(g, 1.0 / len(own_cells), d, w) for g, d, w in own_cells], boot, seed=seed)
    off_target, o_draws = combined_effect(off_cells, boot, seed=seed)
    entry.update(targeted=targeted.as_dict(), off_target=off_target.as_dict(),
                 selectivity=ratio(t_draws, o_draws, targeted.estimate, off_target.estimate).as_dict())
    if draw_cells:
        test = pooled_targeted_vs_random([(d, draws, w) for _g, d, draws, w in draw_cells], seed=seed, n_boot=n_boot)
        entry["targeted_minus_random"] = test.as_dict()
        entry["random"] = {"estimate": test.random, "ci_low": test.random_ci_low, "ci_high": test.random_ci_high,
                           "n_random": test.n_random}
        entry["per_group"] = {g: pooled_targeted_vs_random([(d, draws, w)], seed=seed, n_boot=n_boot).as_dict()
                              for g, d, draws, w in draw_cells}
    return entry


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The headline table of a :func:`summarize` result, one line per method and measure.

    Each effect prints as ``estimate [95% interval]``. ``targeted - random`` is the draw test's
    estimate with its two-level interval; ``p`` its rank p-value over the draws (``n`` draws per
    group) and, for a primary test, the Holm-adjusted value; ``sel.`` the selectivity (targeted /
    off-target; n/a when the off-target interval contains 0). Groups left out of accuracy as not
    testable are named below the table.
    """

    def effect(e: Mapping[str, float]) -> str:
        if e.get("estimate") is None or e["estimate"] != e["estimate"]:
            return "n/a"
        if "ci_low" not in e:
            return f"{e['estimate']:+.3f}"
        return f"{e['estimate']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"

    def sel(r: Mapping[str, Any]) -> str:
        if r.get("defined") is False or r.get("estimate") is None or r["estimate"] != r["estimate"]:
            return "n/a"
        return f"{r['estimate']:.2f}"

    def p(test: Mapping[str, Any]) -> str:
        if "p_value" not in test:
            return "n/a"
        text = f"{test['p_value']:.2g}"
        return text + (f" (Holm {test['p_holm']:.2g})" if "p_holm" in test else "")

    header = (f"{'method':<8} {'measure':<20} {'targeted':>24} {'off-target':>24} {'random (mean of draws)':>24} "
              f"{'targeted - random':>24} {'sel.':>6} {'n':>4}  p vs random")
    lines, untestable, no_targets = [header], set(), {}
    for method, entries in summary.items():
        if not isinstance(entries, Mapping) or method in ("base",):
            continue
        for measure, e in entries.items():
            if measure not in MEASURES or not isinstance(e, Mapping):
                continue
            untestable |= set(e.get("not_testable", []))
            if e.get("no_targets"):
                no_targets[method] = (e["no_targets"], e.get("groups", []))
            d = e["targeted_minus_random"]
            lines.append(f"{method:<8} {MEASURE_LABELS[measure]:<20} {effect(e['targeted']):>24} "
                         f"{effect(e['off_target']):>24} {effect(e['random']):>24} {effect(d):>24} "
                         f"{sel(e['selectivity']):>6} {d.get('n_random', 0):>4}  {p(d)}")
    floor = sorted({f"{method} {MEASURE_LABELS[measure]}" for method, entries in summary.items()
                    if isinstance(entries, Mapping) for measure, e in entries.items()
                    if measure in MEASURES and isinstance(e, Mapping)
                    and e["targeted_minus_random"].get("p_min", 0.0) > 0.05})
    if floor:
        lines.append("too few distinct random draws for p to go below 0.05 (p >= 1 / prod over groups of (draws + 1)): "
                     + ", ".join(floor))
    for method, (empty, kept) in no_targets.items():
        if kept:
            lines.append(f"{method}: no item reached the selection threshold for {', '.join(empty)}, so nothing was "
                         f"ablated there; its rows average over {', '.join(kept)} only (lower it with "
                         f"--threshold {method}=X; the warnings name the largest X that selects something)")
        else:
            lines.append(f"{method}: no item reached the selection threshold for any group: nothing was ablated and "
                         f"its rows measure nothing (lower it with --threshold {method}=X)")
    if untestable:
        lines.append(f"not testable on accuracy (base accuracy not clearly above chance and the answer-blind "
                     f"baseline), left out of the accuracy rows: {', '.join(sorted(untestable))}")
    return lines


MEASURE_LABELS = {"drop": "accuracy drop", "loss_increase": "loss increase",
                  "answer_loss_increase": "answer-token loss", "other_loss_increase": "other-token loss"}
