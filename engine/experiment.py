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
from engine.store import TraceStore
from engine.targets import Targets

METHODS = ("paths", "experts", "pairs")
RESULT_COLUMNS = ("method", "targeted_group", "evaluated_group", "seed", "n_items", "coverage",
                  "base_accuracy", "ablated_accuracy", "drop", "base_loss", "ablated_loss", "loss_increase")


def _group_name(values: Sequence[str]) -> str:
    return "/".join(str(v) for v in values)


def _mean_by(table: Mapping[str, np.ndarray], by: Sequence[str], column: str) -> dict[str, float]:
    """{group name: mean of ``column``} over the rows of a per-question table, groups by ``by``."""
    keys = np.asarray(["/".join(v) for v in zip(*(np.asarray(table[b], dtype=str) for b in by))]) if by \
        else np.full(len(table[column]), "all")
    values = np.asarray(table[column], dtype=np.float64)
    return {str(k): float(values[keys == k].mean()) for k in np.unique(keys)}


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

    def evaluate(store_path: Path | None = None) -> tuple[dict, dict]:
        mc = multiple_choice_accuracy(model, tokenizer, questions, by=labels, batch_size=batch_size,
                                      progress=False, store=store_path,
                                      capture_fn=capture if store_path is not None else None)
        acc = _mean_by(mc.table, by, "correct")
        loss = {}
        if texts:
            pp = perplexity(model, tokenizer, texts, by=by, batch_size=batch_size, progress=False)
            loss = {_group_name(k): v for k, v in pp.by_group().items()}
        return acc, loss

    # 1. base evaluation, capturing the routing of every scored token
    trace = out / "trace.zarr"
    if trace.exists():
        shutil.rmtree(trace)
    base_acc, base_loss = evaluate(trace)
    store = TraceStore.open(trace)

    # 2. counts by group
    # what the targets need, plus every statistic the report has a section for
    from engine.report import REPORT_STATS

    stats = list(dict.fromkeys(["experts", "paths", "pairs", "temporal", *REPORT_STATS]))
    counts = count(store, stats=stats, by=by, skip_shared_prefix=True, progress=False)
    save_counts(counts, out / "counts.zarr")
    groups = [dict(zip(by, values)) for values in metrics.group_names(counts)]

    # 3-4. targets, coverage, ablated evaluations, random controls
    rows: list[dict[str, Any]] = []
    targets_dir = out / "targets"
    targets_dir.mkdir(exist_ok=True)
    jobs = [(method, group) for method in methods for group in groups]
    for method, group in tqdm(jobs, desc="ablations", disable=not progress, unit="target"):
        targeted = _group_name(group.values())
        selection = metrics.specialized(counts, method, group, threshold=thresholds.get(method))
        real = Targets.from_specialized(method, selection, mask_mode=mask_mode)
        real.save_bare(targets_dir / f"{targeted.replace('/', '_')}_{method}.json", method)
        variants = [(method, -1, real)]
        variants += [(f"random:{method}", s, random_like(selection, counts, method, seed * 1000 + s, mask_mode))
                     for s in range(n_random)]
        for name, variant_seed, targets in variants:
            cov = coverage(store, targets, by=by, kind=method, skip_shared_prefix=True, progress=False)
            prop = cov["prop_targeted"].transpose(*by)
            cov_by_group = {_group_name(k): float(v) for k, v in
                            zip(product(*(prop[b].values.tolist() for b in by)), prop.values.reshape(-1))}
            if targets.is_empty():
                acc, loss = base_acc, base_loss
            else:
                try:
                    with intervene(model, targets):
                        acc, loss = evaluate()
                except MoetraceError as exc:
                    # e.g. a layer left with fewer than top_k selectable experts: no valid routing
                    # exists; record the target as not evaluable rather than stop the experiment.
                    warnings.warn(f"{name} targets of {targeted} not evaluated: {exc}", stacklevel=2)
                    acc, loss = {}, {}
            for evaluated in base_acc:
                rows.append({
                    "method": name, "targeted_group": targeted, "evaluated_group": evaluated,
                    "seed": variant_seed, "n_items": targets.n_rules()[method],
                    "coverage": cov_by_group.get(evaluated, float("nan")),
                    "base_accuracy": base_acc[evaluated], "ablated_accuracy": acc.get(evaluated, float("nan")),
                    "drop": base_acc[evaluated] - acc.get(evaluated, float("nan")),
                    "base_loss": base_loss.get(evaluated, float("nan")),
                    "ablated_loss": loss.get(evaluated, float("nan")),
                    "loss_increase": loss.get(evaluated, float("nan")) - base_loss.get(evaluated, float("nan")),
                })

    table = {col: np.asarray([r[col] for r in rows]) for col in RESULT_COLUMNS}
    write_results(table, out / "results.csv")
    summary = summarize(table)
    summary["base_accuracy"] = base_acc
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return table


def write_results(table: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write the results table as CSV (pyarrow), one row per (method, targeted, evaluated, seed)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    path = Path(path)
    pacsv.write_csv(pa.table({k: np.asarray(v) for k, v in table.items()}), path)
    return path


def summarize(table: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Headline numbers per method from a results table, for accuracy and (when measured) loss.

    For each real method m and a measure x (``drop``: accuracy drop; ``loss_increase``):
    ``targeted_<x>`` = mean over targeted groups of x on that group; ``off_target_<x>`` = mean
    over targeted groups of the mean x on the other groups; ``random_<x>`` = the targeted-group x
    under ``random:m`` (mean over seeds); ``selectivity`` / ``loss_selectivity`` = targeted /
    off-target and ``vs_random`` / ``loss_vs_random`` = targeted / random (inf when the
    denominator is <= 0 and the numerator positive, NaN when both are <= 0 or either is NaN). Targets that could
    not be evaluated (NaN rows) are left out of the means.
    """
    method = np.asarray(table["method"], dtype=str)
    targeted = np.asarray(table["targeted_group"], dtype=str)
    evaluated = np.asarray(table["evaluated_group"], dtype=str)
    own = targeted == evaluated

    def ratio(a: float, b: float) -> float:
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
                          f"{prefix}selectivity": ratio(t, o), f"{prefix}vs_random": ratio(t, r)})
        out[m] = entry
    return out
