"""The main job: do a group's specialized routes carry that group's ability?

``run_experiment`` chains the engine end to end, as seed 000 does by hand:

1. base evaluation: multiple-choice accuracy per group (and per-group loss on texts, when
   given), capturing the routing of every scored prompt token into ``OUT/trace.zarr``;
2. counts of that trace by group (``experts``, ``paths``, ``pairs``), after seed 000's
   shared-prefix filter (``OUT/counts.zarr``);
3. for every targeted group and method: seed 000's specialized items
   (``engine.metrics.specialized``) as ``Targets`` (``OUT/targets/<group>_<method>.json``,
   the bare seed-000 format), their coverage of every group's routes, and the evaluation of
   every group under ``intervene(model, targets)``;
4. a control per targeted group and method: the same number of items per layer drawn at
   random (``n_random`` seeds) from the items the trace actually routes, evaluated the same
   way, so a drop can be told apart from "any ablation hurts";
5. one tidy table, ``OUT/results.csv``: a row per (method, targeted group, evaluated group,
   seed) with ``base_accuracy``, ``ablated_accuracy``, ``drop``, losses, ``n_items``,
   ``coverage``; random-control rows have method ``random:<method>``.

``summarize`` turns the table into the headline numbers: per method, the drop on the targeted
group, the mean drop on the other groups, the random control's drop on the targeted group,
and the selectivity (targeted drop / mean off-target drop).
"""

from __future__ import annotations

import json
import shutil
import warnings
from itertools import product
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from engine.progress import tqdm

from engine import metrics
from engine.aggregate import count, coverage, save_counts
from engine.capture import capture
from engine.errors import MoetraceError
from engine.evaluate import multiple_choice_accuracy, perplexity
from engine.intervene import intervene
from engine.significance import PairedBootstrap, combined_effect, paired_effect, ratio
from engine.store import TraceStore
from engine.targets import Targets

METHODS = ("paths", "experts", "pairs")
RESULT_COLUMNS = ("method", "targeted_group", "evaluated_group", "seed", "n_items", "coverage",
                  "base_accuracy", "ablated_accuracy", "drop", "base_loss", "ablated_loss", "loss_increase",
                  "n_questions", "drop_ci_low", "drop_ci_high", "drop_p_value",
                  "n_texts", "loss_ci_low", "loss_ci_high", "loss_p_value")
# OUT/items.csv: one row per evaluated item per variant (the paired data every interval comes from).
# kind "question": base/ablated = 1 if answered correctly, weight 1; kind "text": base/ablated =
# the text's mean next-token loss, weight = its scored tokens.
ITEM_COLUMNS = ("kind", "method", "targeted_group", "seed", "evaluated_group", "item", "base", "ablated", "weight")
N_BOOT = 2000
# OUT/dose_response.csv: one row per (method, mode, targeted group, evaluated group, n_ablated,
# control or not, seed); ``dose`` is the requested step the row answers ("1", "4", ..., or "all",
# whose n_ablated differs between targeted groups); the share of the evaluated group's routes the
# ablated items cover (a rare route can be highly specialized yet carry few tokens), accuracy/loss
# under that ablation, with the paired effect's interval.
DOSE_COLUMNS = ("method", "mode", "targeted_group", "evaluated_group", "n_ablated", "dose", "is_random", "seed", "coverage",
                "accuracy", "drop", "drop_ci_low", "drop_ci_high", "drop_p_value",
                "loss", "loss_increase", "loss_ci_low", "loss_ci_high", "loss_p_value")


def _group_name(values: Sequence[str]) -> str:
    return "/".join(str(v) for v in values)


def _group_keys(table: Mapping[str, np.ndarray], by: Sequence[str], n: int) -> np.ndarray:
    return np.asarray(["/".join(v) for v in zip(*(np.asarray(table[b], dtype=str) for b in by))]) if by \
        else np.full(n, "all")


def _items_by(table: Mapping[str, np.ndarray], by: Sequence[str], index: str,
              columns: Sequence[str]) -> dict[str, tuple[np.ndarray, ...]]:
    """{group name: (item index [n], column arrays [n]...)} of a per-item table, items in index order."""
    keys = _group_keys(table, by, len(table[index]))
    order = np.argsort(np.asarray(table[index]), kind="stable")
    keys = keys[order]
    return {str(k): (np.asarray(table[index])[order][keys == k],
                     *(np.asarray(table[c])[order][keys == k] for c in columns)) for k in np.unique(keys)}


def _loss_of(items: tuple[np.ndarray, ...]) -> float:
    _, loss, weight = items
    return float((loss * weight).sum() / weight.sum())


def random_like(selection: metrics.Selection, counts, method: str, seed: int, mask_mode: str = "reroute") -> Targets:
    """Targets with as many items per layer as ``selection``, drawn uniformly at random (without
    replacement) among the items with a non-zero count in ``counts`` at that layer.

    The items are real routes of the trace (an expert that was chosen, a path that was taken, a
    pair that occurred), so the control ablates as much routing structure as the real targets.
    """
    var, item_dims, _, _ = metrics.SPECIALIZATION_METHODS[method]
    da = counts[var]
    if var == "experts":
        da = da.sel(rank=0)
    totals = da.sum([d for d in da.dims if d not in ("layer", *item_dims)]).transpose("layer", *item_dims)
    rng = np.random.default_rng(seed)
    layers_out, items_out = [], []
    layer_ids = counts["layer"].values
    for layer in np.unique(selection.layer):
        want = int(np.sum(selection.layer == layer))
        pos = int(np.flatnonzero(layer_ids == layer)[0])
        candidates = np.argwhere(totals.values[pos] > 0)
        pick = candidates[rng.choice(len(candidates), size=min(want, len(candidates)), replace=False)]
        layers_out += [int(layer)] * len(pick)
        items_out += pick.tolist()

    class _Items:
        layer = np.asarray(layers_out, dtype=np.int64)
        items = np.asarray(items_out, dtype=np.int64).reshape(len(layers_out), len(item_dims))

    return Targets.from_specialized(method, _Items(), mask_mode=mask_mode)


def run_experiment(
    model,
    tokenizer,
    questions: Sequence[Mapping[str, str]],
    out_dir: str | Path,
    *,
    texts: Sequence[Mapping[str, str]] | None = None,
    methods: Sequence[str] = METHODS,
    by: Sequence[str] = ("domain",),
    labels: Sequence[str] = ("domain", "lang"),
    thresholds: Mapping[str, float] | None = None,
    mask_mode: str = "reroute",
    n_random: int = 3,
    seed: int = 0,
    batch_size: int = 32,
    doses: Sequence[int | str] | None = None,
    modes: Sequence[str] = ("reroute",),
    dose_random: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run the ablation experiment (module docstring) and return the results table.

    questions: MMLU-format dicts (``question, A-D, answer`` + labels); texts: optional dicts
    with ``text`` + labels for per-group loss. by: the labels that define a group (targets are
    selected and drops reported per group); labels: the label columns captured into the trace
    (must include ``by``). thresholds: per-method override of seed 000's thresholds (1 / 5 / 5;
    a threshold times a group's share above 1 selects nothing, e.g. 5 with 4 equal groups).
    mask_mode: "reroute" (a masked route sends the token to its next-best expert) or "zero"
    (the route stays selected with weight 0), for the targets and the random controls alike.
    doses: when given (e.g. ``[1, 2, 4, 8, "all"]``), also the dose-response experiment
    (:func:`dose_ladder`): for every targeted group and method, the n most specialized items and
    n random real routes (``dose_random`` draws, default ``n_random``), for each n and each mask
    mode in ``modes``, written to ``OUT/dose_response.csv`` (``DOSE_COLUMNS``).
    Returns the table as a dict of equal-length arrays (also written to ``OUT/results.csv``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by, labels = list(by), list(labels)
    missing = [b for b in by if b not in labels]
    if missing:
        raise MoetraceError(f"by: {missing} must be among the captured labels {labels}")
    for method in methods:
        if method not in METHODS:
            raise MoetraceError(f"methods: expected items of {list(METHODS)}, got {method!r}")
    thresholds = dict(thresholds or {})
    dose_list = parse_doses(doses) if doses is not None else None
    for mode in modes:
        if mode not in ("reroute", "zero"):
            raise MoetraceError(f"modes: expected items of ['reroute', 'zero'], got {mode!r}")

    def evaluate(store_path: Path | None = None) -> tuple[dict, dict]:
        """Per group: (question ids, correct bool) and (text ids, per-text loss, scored tokens)."""
        mc = multiple_choice_accuracy(model, tokenizer, questions, by=labels, batch_size=batch_size,
                                      progress=False, store=store_path,
                                      capture_fn=capture if store_path is not None else None)
        acc = _items_by(mc.table, by, "q", ["correct"])
        loss = {}
        if texts:
            pp = perplexity(model, tokenizer, texts, by=by, batch_size=batch_size, progress=False)
            loss = _items_by(pp.table, by, "text", ["loss", "n_tokens"])
        return acc, loss

    ablation_results: dict[str, tuple[dict, dict]] = {}

    def evaluate_ablated(targets: Targets, what: str) -> tuple[dict, dict]:
        """evaluate() under ``intervene(model, targets)``, once per distinct set of targets (a dose
        of "all" and the main experiment's targets, or the same random draw, are the same ablation).
        Empty targets give the base results; targets with no valid routing give ``({}, {})``."""
        if targets.is_empty():
            return base_acc, base_loss
        key = json.dumps(targets.to_dict(), sort_keys=True)
        if key not in ablation_results:
            try:
                with intervene(model, targets):
                    ablation_results[key] = evaluate()
            except MoetraceError as exc:
                # e.g. a layer left with fewer than top_k selectable experts: no valid routing
                # exists; record the target as not evaluable rather than stop the experiment.
                warnings.warn(f"{what} not evaluated: {exc}", stacklevel=3)
                ablation_results[key] = ({}, {})
        return ablation_results[key]

    # 1. base evaluation, capturing the routing of every scored token
    trace = out / "trace.zarr"
    if trace.exists():
        shutil.rmtree(trace)
    base_acc, base_loss = evaluate(trace)
    store = TraceStore.open(trace)

    # 2. counts by group
    # what the targets need, plus every statistic the report has a section for
    from engine.report import REPORT_STATS

    from kernels.counting import STATS

    # a top-1 model has no pairs: a method that needs them is an error, a report statistic is left out
    method_stats = [metrics.SPECIALIZATION_METHODS[m][0] for m in methods]
    for name in method_stats:
        if store.top_k < STATS[name].min_top_k:
            raise MoetraceError(f"methods: {name} needs a model with top_k >= {STATS[name].min_top_k}, "
                                f"got top_k={store.top_k}; leave it out of methods")
    stats = [name for name in dict.fromkeys([*method_stats, "temporal", *REPORT_STATS])
             if store.top_k >= STATS[name].min_top_k]
    counts = count(store, stats=stats, by=by, skip_shared_prefix=True, progress=False)
    save_counts(counts, out / "counts.zarr")
    groups = [dict(zip(by, values)) for values in metrics.group_names(counts)]

    # 3-4. targets, coverage, ablated evaluations, random controls
    boot = PairedBootstrap({g: len(v[0]) for g, v in base_acc.items()}, n_boot=N_BOOT, seed=seed)
    text_boot = PairedBootstrap({g: len(v[0]) for g, v in base_loss.items()}, n_boot=N_BOOT, seed=seed)
    rows: list[dict[str, Any]] = []
    items: list[dict[str, np.ndarray]] = []
    targets_dir = out / "targets"
    targets_dir.mkdir(exist_ok=True)
    jobs = [(method, group) for method in methods for group in groups]
    doses_rows: list[dict[str, Any]] = []
    for method, group in tqdm(jobs, desc="ablations", disable=not progress, unit="target"):
        targeted = _group_name(group.values())
        selection = metrics.specialized(counts, method, group, threshold=thresholds.get(method))
        if dose_list is not None:
            doses_rows += _dose_rows(store, by, selection, counts, method, targeted, dose_list, modes,
                                     n_random if dose_random is None else dose_random, seed,
                                     evaluate_ablated, base_acc, base_loss, boot, text_boot)
        real = Targets.from_specialized(method, selection, mask_mode=mask_mode)
        real.save_bare(targets_dir / f"{targeted.replace('/', '_')}_{method}.json", method)
        variants = [(method, -1, real)]
        variants += [(f"random:{method}", s, random_like(selection, counts, method, seed * 1000 + s, mask_mode))
                     for s in range(n_random)]
        for name, variant_seed, targets in variants:
            cov_by_group = _coverage_by_group(store, targets, by, method)
            acc, loss = evaluate_ablated(targets, f"{name} targets of {targeted}")
            for evaluated in base_acc:
                variant = {"method": name, "targeted_group": targeted, "evaluated_group": evaluated,
                           "seed": variant_seed}
                row = {**variant, "n_items": targets.n_rules()[method],
                       "coverage": cov_by_group.get(evaluated, float("nan")),
                       **_paired_columns(base_acc, acc, base_loss, loss, evaluated, boot, text_boot, seed)}
                rows.append(row)
                items += _item_rows(variant, base_acc, acc, base_loss, loss, evaluated)

    table = {col: np.asarray([r[col] for r in rows]) for col in RESULT_COLUMNS}
    write_results(table, out / "results.csv")
    if dose_list is not None:
        write_results({col: np.asarray([r[col] for r in doses_rows]) for col in DOSE_COLUMNS},
                      out / "dose_response.csv")
    item_table = {col: np.concatenate([np.asarray(block[col]) for block in items]) for col in ITEM_COLUMNS}
    write_results(item_table, out / "items.csv")
    summary = summarize(table, item_table, seed=seed)
    summary["base_accuracy"] = {g: float(v[1].mean()) for g, v in base_acc.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return table


def _coverage_by_group(store, targets: Targets, by: Sequence[str], method: str) -> dict[str, float]:
    """{group name: share of the group's ``method`` routes that ``targets`` cover} (seed 000's coverage)."""
    cov = coverage(store, targets, by=by, kind=method, skip_shared_prefix=True, progress=False)
    prop = cov["prop_targeted"].transpose(*by)
    return {_group_name(k): float(v) for k, v in
            zip(product(*(prop[b].values.tolist() for b in by)), prop.values.reshape(-1))}


def _paired_columns(base_acc: dict, acc: dict, base_loss: dict, loss: dict, group: str,
                    boot: PairedBootstrap, text_boot: PairedBootstrap, seed: int) -> dict[str, Any]:
    """results.csv's measures of one (variant, evaluated group) with their paired intervals;
    NaN where the variant was not evaluated (or no texts were given)."""
    nan = float("nan")
    base_correct = base_acc[group][1]
    out: dict[str, Any] = {"base_accuracy": float(base_correct.mean()), "n_questions": len(base_correct)}
    if group in acc:
        drop = paired_effect(base_correct, acc[group][1], boot=boot, name=group, seed=seed)
        out.update(ablated_accuracy=float(acc[group][1].mean()), drop=drop.estimate, drop_ci_low=drop.ci_low,
                   drop_ci_high=drop.ci_high, drop_p_value=drop.p_value)
    else:
        out.update(ablated_accuracy=nan, drop=nan, drop_ci_low=nan, drop_ci_high=nan, drop_p_value=nan)
    base_l = _loss_of(base_loss[group]) if group in base_loss else nan
    out.update(base_loss=base_l, n_texts=len(base_loss[group][0]) if group in base_loss else 0)
    if group in loss and group in base_loss:
        _, base_per_text, weight = base_loss[group]
        inc = paired_effect(loss[group][1], base_per_text, weight, boot=text_boot, name=group, seed=seed)
        out.update(ablated_loss=_loss_of(loss[group]), loss_increase=inc.estimate, loss_ci_low=inc.ci_low,
                   loss_ci_high=inc.ci_high, loss_p_value=inc.p_value)
    else:
        out.update(ablated_loss=nan, loss_increase=nan, loss_ci_low=nan, loss_ci_high=nan, loss_p_value=nan)
    return out


def _item_rows(variant: Mapping[str, Any], base_acc: dict, acc: dict, base_loss: dict, loss: dict,
               group: str) -> list[dict[str, np.ndarray]]:
    """items.csv rows of one (variant, evaluated group): its questions, then its texts."""
    blocks = []
    for kind, base, ablated in (("question", base_acc, acc), ("text", base_loss, loss)):
        if group not in base or group not in ablated:
            continue
        ids, base_value = base[group][0], base[group][1].astype(np.float64)
        weight = np.ones(len(ids)) if kind == "question" else base[group][2].astype(np.float64)
        blocks.append({"kind": np.full(len(ids), kind), **{k: np.full(len(ids), v) for k, v in variant.items()},
                       "item": ids, "base": base_value, "ablated": ablated[group][1].astype(np.float64),
                       "weight": weight})
    return blocks


def write_results(table: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write the results table as CSV (pyarrow), one row per (method, targeted, evaluated, seed)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    path = Path(path)
    pacsv.write_csv(pa.table({k: np.asarray(v) for k, v in table.items()}), path)
    return path


def summarize(table: Mapping[str, np.ndarray], items: Mapping[str, np.ndarray] | None = None, *,
              seed: int = 0, n_boot: int = N_BOOT) -> dict[str, Any]:
    """Headline numbers per method from a results table, for accuracy and (when measured) loss.

    For each real method m and a measure x (``drop``: accuracy drop; ``loss_increase``):
    ``targeted_<x>`` = mean over targeted groups of x on that group; ``off_target_<x>`` = mean
    over targeted groups of the mean x on the other groups; ``random_<x>`` = the targeted-group x
    under ``random:m`` (mean over seeds); ``selectivity`` / ``loss_selectivity`` = targeted /
    off-target and ``vs_random`` / ``loss_vs_random`` = targeted / random (inf when the
    denominator is <= 0 and the numerator positive, NaN when both are <= 0 or either is NaN). Targets that could
    not be evaluated (NaN rows) are left out of the means.

    With ``items`` (the per-item table written to ``OUT/items.csv``, columns ``ITEM_COLUMNS``) every
    headline number gets a 95% paired-bootstrap interval and a sign-flip permutation p-value
    (``engine.significance``), under ``entry["intervals"]["drop" | "loss_increase"]``: ``targeted``,
    ``off_target``, ``random``, ``targeted_minus_random`` (Effect dicts) and ``selectivity``,
    ``vs_random`` (Ratio dicts); the flat ``selectivity`` / ``vs_random`` values then become those
    ratios' estimates, NaN when the denominator's interval contains 0 (never ``inf``).
    """
    method = np.asarray(table["method"], dtype=str)
    targeted = np.asarray(table["targeted_group"], dtype=str)
    evaluated = np.asarray(table["evaluated_group"], dtype=str)
    own = targeted == evaluated

    def ratio_of(a: float, b: float) -> float:
        if np.isnan(a) or np.isnan(b):
            return float("nan")
        if b > 0:
            return a / b
        return float("inf") if a > 0 else float("nan")

    def mean_of_groups(values: np.ndarray, rows: np.ndarray, groups: list[str]) -> float:
        per_group = [values[rows & (targeted == g)] for g in groups]
        per_group = [np.nanmean(v) for v in per_group if len(v) and not np.isnan(v).all()]
        return float(np.mean(per_group)) if per_group else float("nan")

    out: dict[str, Any] = {}
    for m in sorted({x for x in method if not x.startswith("random:")}):
        real, rand = method == m, method == f"random:{m}"
        groups = sorted(set(targeted[real]))
        entry: dict[str, float] = {}
        for measure, prefix, suffix in (("drop", "", "drop"), ("loss_increase", "loss_", "loss_increase")):
            if measure not in table:
                continue
            values = np.asarray(table[measure], dtype=np.float64)
            t = mean_of_groups(values, real & own, groups)
            o = mean_of_groups(values, real & ~own, groups)
            r = mean_of_groups(values, rand & own, groups)
            entry.update({f"targeted_{suffix}": t, f"off_target_{suffix}": o, f"random_{suffix}": r,
                          f"{prefix}selectivity": ratio_of(t, o), f"{prefix}vs_random": ratio_of(t, r)})
        if items is not None:
            entry["intervals"] = _intervals(items, m, seed=seed, n_boot=n_boot)
            for measure, prefix in (("drop", ""), ("loss_increase", "loss_")):
                if measure in entry["intervals"]:
                    entry[f"{prefix}selectivity"] = entry["intervals"][measure]["selectivity"]["estimate"]
                    entry[f"{prefix}vs_random"] = entry["intervals"][measure]["vs_random"]["estimate"]
        out[m] = entry
    return out


def _intervals(items: Mapping[str, np.ndarray], method: str, *, seed: int, n_boot: int) -> dict[str, Any]:
    """Intervals and p-values of one method's headline effects from the per-item table (see summarize)."""
    import pandas as pd

    df = pd.DataFrame({c: np.asarray(items[c]) for c in ITEM_COLUMNS})
    out: dict[str, Any] = {}
    for kind, measure in (("question", "drop"), ("text", "loss_increase")):
        sub = df[(df["kind"] == kind) & df["method"].isin([method, f"random:{method}"])]
        if sub.empty:
            continue
        sign = 1.0 if measure == "drop" else -1.0  # drop = base - ablated; loss increase = ablated - base
        cells = {key: g.sort_values("item") for key, g in sub.groupby(["method", "targeted_group", "evaluated_group"])}
        sizes = {str(e): int(g["item"].nunique()) for e, g in sub.groupby("evaluated_group")}
        boot = PairedBootstrap(sizes, n_boot=n_boot, seed=seed)

        def paired(key):
            """(base [n], ablated [n] averaged over seeds, weight [n]) of one cell, items in id order."""
            g = cells[key]
            mean = g.groupby("item", sort=True).agg(base=("base", "first"), ablated=("ablated", "mean"),
                                                    weight=("weight", "first"))
            return mean["base"].to_numpy(), mean["ablated"].to_numpy(), mean["weight"].to_numpy()

        groups = sorted({t for (m, t, _e) in cells if m == method})
        own, off, rand, diff = [], [], [], []
        for g in groups:
            if (method, g, g) in cells:
                b, a, w = paired((method, g, g))
                own.append((g, sign * (b - a), w))
                if (f"random:{method}", g, g) in cells:
                    _, ar, _ = paired((f"random:{method}", g, g))
                    rand.append((g, sign * (b - ar), w))
                    diff.append((g, sign * (ar - a), w))
            others = [paired((m, t, e)) + (e,) for (m, t, e) in cells if m == method and t == g and e != g]
            if others:
                off.append([(e, sign * (b - a), w) for b, a, w, e in others])

        def cells_of(parts):
            return [(name, 1.0 / len(parts), d, w) for name, d, w in parts]

        # off-target: mean over targeted groups of the mean over the other groups
        off_cells = [(e, 1.0 / (len(off) * len(block)), d, w) for block in off for e, d, w in block]
        targeted, t_draws = combined_effect(cells_of(own), boot, seed=seed)
        off_target, o_draws = combined_effect(off_cells, boot, seed=seed)
        random_, r_draws = combined_effect(cells_of(rand), boot, seed=seed)
        minus_random, _ = combined_effect(cells_of(diff), boot, seed=seed)
        out[measure] = {
            "targeted": targeted.as_dict(), "off_target": off_target.as_dict(), "random": random_.as_dict(),
            "targeted_minus_random": minus_random.as_dict(),
            "selectivity": ratio(t_draws, o_draws, targeted.estimate, off_target.estimate).as_dict(),
            "vs_random": ratio(t_draws, r_draws, targeted.estimate, random_.estimate).as_dict(),
        }
    return out


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """The headline table of a ``summarize`` result with intervals, one line per method and measure.

    Each effect prints as ``estimate [95% interval]``; ratios print ``n/a`` when undefined (the
    denominator's interval contains 0); p-values of the targeted effect and of its difference
    from the random control close the line.
    """

    def effect(e: Mapping[str, float] | None, fallback: float) -> str:
        if e is None:
            return "n/a" if fallback != fallback else f"{fallback:+.3f}"
        if e["estimate"] != e["estimate"]:
            return "n/a"
        return f"{e['estimate']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"

    def ratio_text(r: Mapping[str, float] | None, fallback: float) -> str:
        if r is None:
            return "n/a" if fallback != fallback else f"{fallback:.2f}"
        return f"{r['estimate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" if r["defined"] else "n/a (den. ~0)"

    def p(e: Mapping[str, float] | None) -> str:
        return "n/a" if e is None or e["p_value"] != e["p_value"] else f"{e['p_value']:.3g}"

    header = (f"{'method':<8} {'measure':<14} {'targeted':>26} {'off-target':>26} {'random':>26} "
              f"{'targeted-random':>26} {'selectivity':>18} {'p':>7} {'p vs rand':>9}")
    lines = [header]
    for method, s in summary.items():
        if not isinstance(s, Mapping) or "targeted_drop" not in s:
            continue
        for label, measure, prefix in (("accuracy drop", "drop", ""), ("loss increase", "loss_increase", "loss_")):
            iv = s.get("intervals", {}).get(measure, {})
            value = s.get(f"targeted_{measure}")
            if value is None or (not iv and value != value):
                continue  # not measured (e.g. no texts: no loss)
            diff_fallback = s[f"targeted_{measure}"] - s[f"random_{measure}"]
            lines.append(
                f"{method:<8} {label:<14} {effect(iv.get('targeted'), s[f'targeted_{measure}']):>26} "
                f"{effect(iv.get('off_target'), s[f'off_target_{measure}']):>26} "
                f"{effect(iv.get('random'), s[f'random_{measure}']):>26} "
                f"{effect(iv.get('targeted_minus_random'), diff_fallback):>26} "
                f"{ratio_text(iv.get('selectivity'), s[f'{prefix}selectivity']):>18} "
                f"{p(iv.get('targeted')):>7} {p(iv.get('targeted_minus_random')):>9}")
    return lines


def parse_doses(doses: Sequence[int | str] | str) -> list[int | str]:
    """``"1,2,4,all"`` or ``[1, 2, 4, "all"]`` -> ``[1, 2, 4, "all"]`` (positive ints, at most one "all")."""
    parts = doses.split(",") if isinstance(doses, str) else list(doses)
    out: list[int | str] = []
    for part in parts:
        text = str(part).strip()
        if text == "all":
            out.append("all")
            continue
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise MoetraceError(f"doses: expected positive integers or 'all', got {part!r}")
        out.append(n)
    if not out or len(set(out)) != len(out):
        raise MoetraceError(f"doses: expected a non-empty list without repeats, got {doses!r}")
    return out


def dose_ladder(selection: metrics.Selection, doses: Sequence[int | str]) -> list[tuple[int, metrics.Selection]]:
    """The n most specialized items of ``selection`` for each dose n (``"all"``: every item).

    Items are ranked by their specialization score, the share of their samples that come from the
    group (``prop``, seed 000's criterion), then by their count in the group, then by layer and
    expert ids (deterministic). Doses above the number of items are dropped (``"all"`` stays), and
    repeated sizes are kept once. Returns ``[(n, sub-selection)]`` in increasing n.
    """
    from dataclasses import replace

    n_items = len(selection)
    order = np.lexsort((*selection.items.T[::-1], selection.layer, -selection.n_samples, -selection.prop)) \
        if n_items else np.zeros(0, dtype=np.int64)
    sizes = sorted({n_items if d == "all" else int(d) for d in doses if d == "all" or int(d) <= n_items})
    out = []
    for n in sizes:
        if n == 0:
            continue
        keep = np.sort(order[:n])
        out.append((n, replace(selection, layer=selection.layer[keep], items=selection.items[keep],
                               n_samples=selection.n_samples[keep], n_total=selection.n_total[keep],
                               prop=selection.prop[keep])))
    return out


def _dose_rows(store, by, selection, counts, method: str, targeted: str, doses, modes, n_random: int,
               seed: int, evaluate_ablated, base_acc: dict, base_loss: dict, boot, text_boot) -> list[dict[str, Any]]:
    """dose_response.csv rows of one targeted group and method (every dose, mode and control);
    ``evaluate_ablated(targets, what)`` evaluates every group under one ablation."""
    rows = []
    for n, sub in dose_ladder(selection, doses):
        dose = "all" if "all" in doses and n == len(selection) else str(n)
        for mode in modes:
            variants = [(False, -1, Targets.from_specialized(method, sub, mask_mode=mode))]
            variants += [(True, s, random_like(sub, counts, method, seed * 1000 + s, mode)) for s in range(n_random)]
            for is_random, variant_seed, targets in variants:
                cov_by_group = _coverage_by_group(store, targets, by, method)
                acc, loss = evaluate_ablated(targets, f"dose {n} ({mode}) of {method} targets of {targeted}")
                for evaluated in base_acc:
                    c = _paired_columns(base_acc, acc, base_loss, loss, evaluated, boot, text_boot, seed)
                    rows.append({"method": method, "mode": mode, "targeted_group": targeted,
                                 "evaluated_group": evaluated, "n_ablated": n, "dose": dose, "is_random": is_random,
                                 "coverage": cov_by_group.get(evaluated, float("nan")),
                                 "seed": variant_seed, "accuracy": c["ablated_accuracy"], "drop": c["drop"],
                                 "drop_ci_low": c["drop_ci_low"], "drop_ci_high": c["drop_ci_high"],
                                 "drop_p_value": c["drop_p_value"], "loss": c["ablated_loss"],
                                 "loss_increase": c["loss_increase"], "loss_ci_low": c["loss_ci_low"],
                                 "loss_ci_high": c["loss_ci_high"], "loss_p_value": c["loss_p_value"]})
    return rows
