"""The main job: do a group's specialized routes carry that group's ability?

``run_experiment`` chains the engine end to end, as seed 000 does by hand, with the controls a
reviewer of an ablation study asks for:

1. **base evaluation** of every group: multiple-choice accuracy (answer scoring by default,
   ``moetrace.evaluate``) and, with texts, loss, split into the answer tokens and the rest. Beside
   each group's base accuracy: its chance level and the answer-blind baseline (the options
   scored with the question removed); a group whose base accuracy's 95% Clopper-Pearson
   interval is not above both is **not testable** on accuracy (an ablation cannot show that a
   model loses a skill it does not have) and is left out of the accuracy headline;
2. **held-out routing**: the routing of ``select_texts`` (texts disjoint from the evaluated
   items) is captured into ``OUT/trace.zarr`` and counted by group (``OUT/counts.zarr``), after
   seed 000's shared-prefix filter; without ``select_texts`` the evaluated questions' contexts
   are captured instead, with a warning (targets then come from the evaluated items);
3. for every targeted group and method: seed 000's specialized items (``moetrace.metrics.specialized``)
   as ``Targets`` (``OUT/targets/<group>_<method>.json``), their coverage of every group's
   routes, and the evaluation of every group under ``intervene(model, targets)``;
4. **matched random controls** (:func:`matched_random`): ``n_random`` draws per targeted group
   and method, each with the same number of items per layer as the targets, drawn among the real
   routes of the trace that no group's targets use, and matched on the targeted group's traffic
   (the draw's coverage of the targeted group's routes within ``COVERAGE_BAND`` of the
   targets'); each draw is evaluated on the targeted group's items;
5. tables: ``OUT/results.csv`` (``RESULT_COLUMNS``, a row per variant and evaluated group;
   random draws have method ``random:<method>`` and their draw index in ``seed``),
   ``OUT/items.csv`` (every per-item outcome), ``OUT/base.csv`` (``BASE_COLUMNS``),
   ``OUT/dose_response.csv`` (with ``doses``) and ``OUT/summary.json`` (:func:`moetrace.results.summarize`).

The headline test per method and measure is *targeted versus random over draws*
(``moetrace.significance.pooled_targeted_vs_random``: a rank test over the draws, pooled over
targeted groups, with a two-level bootstrap interval). The **primary tests** are these tests for
every method on accuracy and on loss; their p-values are Holm-adjusted as one family
(``summary["primary_tests"]``). Every other p-value (per group, per evaluated group, item-level)
is secondary; ``results.csv`` also gives Holm-adjusted values over each of its p-value columns.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np
from moetrace.progress import tqdm

from moetrace import metrics
from moetrace.counting import count, save_counts
from moetrace.capture import capture
from moetrace.errors import MoetraceError
from moetrace.evaluate import LETTERS, SCORINGS, answer_context, multiple_choice_accuracy, perplexity
from moetrace.intervene import intervene
from moetrace.kernels.modes import MASK_MODES
from moetrace.results import ITEM_COLUMNS, MEASURES, N_BOOT, item_harm, summarize
from moetrace.significance import PairedBootstrap, holm, paired_effect
from moetrace.store import TraceStore
from moetrace.targets import Targets

METHODS = ("paths", "experts", "pairs")
# A random draw matches the targets when its coverage of the targeted group's routes is within a
# factor COVERAGE_BAND of the targets' coverage (1.25: between 0.8x and 1.25x).
COVERAGE_BAND = 1.25
N_CANDIDATES = 4000  # candidate draws sampled per targets, among which the matched ones are taken
TESTABLE_LEVEL = 0.95

RESULT_COLUMNS = ("method", "targeted_group", "evaluated_group", "seed", "n_items", "coverage",
                  "target_coverage", "in_band", "scoring",
                  "base_accuracy", "ablated_accuracy", "drop", "drop_ci_low", "drop_ci_high", "drop_p_value",
                  "drop_p_holm", "n_questions",
                  "base_loss", "ablated_loss", "loss_increase", "loss_ci_low", "loss_ci_high", "loss_p_value",
                  "loss_p_holm", "n_texts",
                  "answer_loss_increase", "answer_loss_ci_low", "answer_loss_ci_high",
                  "other_loss_increase", "other_loss_ci_low", "other_loss_ci_high")
# OUT/base.csv: one row per group.
BASE_COLUMNS = ("group", "scoring", "n_questions", "base_accuracy", "base_ci_low", "base_ci_high", "chance",
                "blind_accuracy", "testable", "n_texts", "base_loss", "base_answer_loss", "base_other_loss")
# OUT/dose_response.csv: one row per (method, mode, targeted group, evaluated group, dose, variant);
# ``dose`` is the requested step ("1", "8", ..., "all"), ``target_coverage`` the share of the
# targeted group's routes the ablated items cover (the x axis of the dose-response plot); random
# draws are matched on it and evaluated on the targeted group.
DOSE_COLUMNS = ("method", "mode", "targeted_group", "evaluated_group", "n_ablated", "dose", "is_random", "seed",
                "coverage", "target_coverage", "in_band", "accuracy", "drop", "drop_ci_low", "drop_ci_high",
                "drop_p_value", "loss", "loss_increase", "loss_ci_low", "loss_ci_high", "loss_p_value")

# Evaluation results: {kind: {group: (item ids [n], value [n], weight [n])}} (kinds of MEASURES).
Evaluation = dict


def _group_name(values: Sequence[str]) -> str:
    return "/".join(str(v) for v in values)


def _group_keys(items: Sequence[Mapping[str, str]], by: Sequence[str]) -> np.ndarray:
    return np.asarray([_group_name(str(it.get(b, "")) for b in by) if by else "all" for it in items])


# ----------------------------------------------------------------------------- random controls


@dataclass(frozen=True)
class Draw:
    """One random control: its ``targets``, their coverage of the targeted group's routes, and
    whether that coverage is inside the band around the targets' coverage."""

    targets: Targets
    coverage: float
    in_band: bool


class RouteTable:
    """The route counts of one method from a Counts dataset: per group and layer, how often each
    item (expert / path / pair) was taken, over the samples seed 000's coverage counts.

    ``coverage(group, layer, items)`` is the share of a group's routes that items cover: equal to
    ``moetrace.counting.coverage(...)["prop_targeted"]`` for the same targets, without a pass over
    the store.
    """

    def __init__(self, counts, method: str):
        var, item_dims, _, _ = metrics.SPECIALIZATION_METHODS[method]
        da = counts[var]
        if var == "experts":
            da = da.sel(rank=0, drop=True)
        gdims = metrics.group_dims(counts)
        da = da.transpose(*gdims, "layer", *item_dims)
        self.method = method
        self.layers = [int(x) for x in counts["layer"].values]
        self.groups = ["/".join(g) for g in metrics.group_names(counts)] if gdims else ["all"]
        self.by_group = metrics.flatten_groups(da, gdims).astype(np.float64) if gdims \
            else da.values[None].astype(np.float64)  # [G, L, *item]
        self.total = self.by_group.sum(axis=0)  # [L, *item]
        self.width = len(item_dims)

    def group_counts(self, group: str) -> np.ndarray:
        return self.by_group[self.groups.index(group)]

    def coverage_of(self, group: str, layer: np.ndarray, items: np.ndarray) -> float:
        """Share of ``group``'s routes that the items ``(layer id [n], item ids [n, w])`` cover."""
        c = self.group_counts(group)
        total = float(c.sum())
        if total == 0 or len(layer) == 0:
            return 0.0 if total else float("nan")
        pos = np.searchsorted(self.layers, layer)
        return float(c[(pos, *np.asarray(items, dtype=np.int64).T)].sum() / total)


def matched_random(selection: metrics.Selection, routes: RouteTable, group: str, exclude: set, n_draws: int,
                   seed: int, *, band: float = COVERAGE_BAND, mask_mode: str = "reroute",
                   n_candidates: int = N_CANDIDATES) -> list[Draw]:
    """``n_draws`` random controls for the targets ``selection`` of ``group``.

    Each draw has as many items per layer as ``selection`` (fewer where the layer has fewer
    candidates), drawn uniformly without replacement among the layer's candidates: items the
    trace routes at least once (over all groups) that are not in ``exclude`` (every group's
    specialized items of this method, as ``(layer, *item)`` tuples). Of ``n_candidates`` such
    draws, the ones whose coverage of ``group``'s routes lies within a factor ``band`` of the
    targets' coverage are taken in the order drawn; when fewer than ``n_draws`` do, the rest are
    the closest others (by the ratio of coverages), marked ``in_band=False``. Draws are distinct:
    when the candidates allow fewer distinct sets (at the extreme one, when every layer's
    candidates are all taken), fewer draws come back, and the tests over draws see only those.
    """
    if n_draws < 1 or len(selection) == 0:
        return []
    rng = np.random.default_rng(seed)
    c = routes.group_counts(group)
    group_total = float(c.sum())
    target_cov = routes.coverage_of(group, selection.layer, selection.items)
    covered = np.zeros(n_candidates)
    picks = []  # per layer: (layer id, candidates [m, w], chosen indices [n_candidates, k])
    for layer in np.unique(selection.layer):
        pos = routes.layers.index(int(layer))
        want = int(np.sum(selection.layer == layer))
        cand = np.argwhere(routes.total[pos] > 0)
        keep = [tuple(x) not in exclude for x in ((int(layer), *map(int, row)) for row in cand)]
        cand = cand[np.asarray(keep, dtype=bool)] if len(cand) else cand
        k = min(want, len(cand))
        if k == 0:
            continue
        # k of the layer's candidates per draw, uniformly without replacement (random keys, smallest
        # k), in blocks of draws so a layer of many candidates (pairs of 128 experts) stays small
        block = max(1, 2_000_000 // len(cand))
        chosen = np.concatenate([np.argsort(rng.random((min(block, n_candidates - i), len(cand))), axis=1)[:, :k]
                                 for i in range(0, n_candidates, block)])
        covered += c[(pos, *cand.T)][chosen].sum(axis=1)
        picks.append((int(layer), cand, chosen))
    if not picks:
        return []
    cov = covered / group_total if group_total else np.zeros(n_candidates)
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = np.abs(np.log(cov / target_cov)) if target_cov > 0 else np.abs(cov)
    distance = np.nan_to_num(distance, nan=np.inf, posinf=np.inf)
    inside = distance <= np.log(band) + 1e-12
    order = np.concatenate([np.flatnonzero(inside), np.flatnonzero(~inside)[np.argsort(distance[~inside],
                                                                                        kind="stable")]])
    draws, seen = [], set()
    for i in order:
        if len(draws) == n_draws:
            break
        layers = np.concatenate([np.full(ch.shape[1], layer) for layer, _cand, ch in picks]).astype(np.int64)
        items = np.concatenate([cand[ch[i]] for _layer, cand, ch in picks]).reshape(len(layers), routes.width)
        key = frozenset(zip(layers.tolist(), map(tuple, items.tolist())))
        if key in seen:
            continue
        seen.add(key)
        drawn = SimpleNamespace(layer=layers, items=items.astype(np.int64))
        draws.append(Draw(Targets.from_specialized(routes.method, drawn, mask_mode=mask_mode),
                          float(cov[i]), bool(inside[i])))
    return draws


def _selection_set(selection: metrics.Selection) -> set:
    return {(int(layer), *map(int, item)) for layer, item in zip(selection.layer, selection.items)}


# ----------------------------------------------------------------------------- the experiment


def _ci_prefix(measure: str) -> str:
    return measure.removesuffix("_increase")


def _weighted(values: np.ndarray, weights: np.ndarray) -> float:
    total = float(weights.sum())
    return float((values * weights).sum() / total) if total > 0 else float("nan")


def _base_rows(base: Evaluation, blind: dict[str, np.ndarray] | None, scoring: str) -> list[dict[str, Any]]:
    """base.csv: per group its base accuracy with a Clopper-Pearson interval, chance, the
    answer-blind accuracy and whether accuracy effects are testable there (module docstring)."""
    from scipy.stats import binomtest

    chance = 1.0 / len(LETTERS)
    rows = []
    for group, (_ids, correct, _w) in sorted(base["question"].items()):
        k, n = int(correct.sum()), len(correct)
        ci = binomtest(k, n).proportion_ci(TESTABLE_LEVEL, method="exact")
        blind_acc = float(blind[group].mean()) if blind is not None else float("nan")
        floor = chance if blind is None else max(chance, blind_acc)
        row = {"group": group, "scoring": scoring, "n_questions": n, "base_accuracy": k / n,
               "base_ci_low": float(ci.low), "base_ci_high": float(ci.high), "chance": chance,
               "blind_accuracy": blind_acc, "testable": bool(ci.low > floor)}
        texts = {kind: base.get(kind, {}).get(group) for kind in ("text", "text_answer", "text_other")}
        row["n_texts"] = len(texts["text"][0]) if texts["text"] is not None else 0
        for kind, column in (("text", "base_loss"), ("text_answer", "base_answer_loss"),
                             ("text_other", "base_other_loss")):
            row[column] = _weighted(texts[kind][1], texts[kind][2]) if texts[kind] is not None else float("nan")
        rows.append(row)
    return rows


def run_experiment(
    model,
    tokenizer,
    questions: Sequence[Mapping[str, str]],
    out_dir: str | Path,
    *,
    texts: Sequence[Mapping[str, Any]] | None = None,
    select_texts: Sequence[Mapping[str, Any]] | None = None,
    methods: Sequence[str] = METHODS,
    by: Sequence[str] = ("domain",),
    labels: Sequence[str] = ("domain", "lang"),
    thresholds: Mapping[str, float] | None = None,
    mask_mode: str = "reroute",
    n_random: int = 20,
    seed: int = 0,
    batch_size: int = 32,
    scoring: str = "answer",
    band: float = COVERAGE_BAND,
    doses: Sequence[int | str] | None = None,
    modes: Sequence[str] = ("reroute",),
    dose_random: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run the ablation experiment (module docstring) and return the results table.

    questions: MMLU-format dicts (``question, A-D, answer`` + labels, optionally ``context``);
    texts: optional dicts with ``text`` + labels (+ ``answer_spans``) for per-group loss;
    select_texts: texts (with the ``labels``) disjoint from the evaluated items, whose routing
    selects the targets. by: the labels that define a group; labels: the label columns captured
    into the trace (must include ``by``). thresholds: per-method override of seed 000's
    thresholds (1 / 5 / 5; a threshold times a group's share above 1 selects nothing, e.g. 5
    with 4 equal groups). mask_mode: "reroute" (a masked route sends the token to its next-best
    expert) or "zero" (the route stays selected with weight 0). n_random: matched random draws
    per targets (:func:`matched_random`, within ``band``). scoring: ``"answer"`` or ``"letter"``
    (``moetrace.evaluate``). doses: when given (e.g. ``[1, 2, 4, 8, "all"]``), also the
    dose-response experiment: for every targeted group and method, the n most specialized items
    (:func:`dose_ladder`) evaluated on every group, and ``dose_random`` matched draws (default
    ``min(n_random, 5)``) at the same coverage evaluated on the targeted group, for each mask mode
    in ``modes``, written to ``OUT/dose_response.csv``.
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
    if scoring not in SCORINGS:
        raise MoetraceError(f"scoring: expected one of {list(SCORINGS)}, got {scoring!r}")
    if n_random < 1:
        raise MoetraceError(f"n_random: expected a positive number of random draws, got {n_random}")
    if not band >= 1:
        raise MoetraceError(f"band: expected a factor >= 1 around the targets' coverage, got {band}")
    thresholds = dict(thresholds or {})
    dose_list = parse_doses(doses) if doses is not None else None
    dose_random = min(n_random, 5) if dose_random is None else dose_random
    for mode in modes:
        if mode not in MASK_MODES:
            raise MoetraceError(f"modes: expected items of {list(MASK_MODES)}, got {mode!r}")
    for name, items in (("questions", questions), ("texts", texts or []), ("select_texts", select_texts or [])):
        lacking = [i for i, it in enumerate(items) if any(b not in it for b in labels)]
        if lacking:
            raise MoetraceError(f"{name}: item {lacking[0]}: expected the labels {labels}, got keys {sorted(items[lacking[0]])}")

    q_groups = _group_keys(questions, by)
    group_list = sorted(set(q_groups.tolist()))
    q_idx = {g: np.flatnonzero(q_groups == g) for g in group_list}
    t_groups = _group_keys(texts, by) if texts else np.zeros(0, dtype=str)
    t_idx = {g: np.flatnonzero(t_groups == g) for g in group_list}

    def evaluate(groups: Sequence[str]) -> Evaluation:
        """Every per-item outcome of ``groups`` under the model as it is now."""
        ev: Evaluation = {}
        qi = np.concatenate([q_idx[g] for g in groups])
        mc = multiple_choice_accuracy(model, tokenizer, [questions[i] for i in qi], scoring=scoring, by=(),
                                      batch_size=batch_size, progress=False)
        correct, at = mc.table["correct"].astype(np.float64), 0
        for g in groups:
            n = len(q_idx[g])
            ev.setdefault("question", {})[g] = (q_idx[g], correct[at:at + n], np.ones(n))
            at += n
        ti = np.concatenate([t_idx[g] for g in groups])
        if len(ti):
            tab = perplexity(model, tokenizer, [texts[i] for i in ti], by=(), batch_size=batch_size,
                             progress=False).table
            columns = {"text": ("loss", "n_tokens")}
            if "answer_loss" in tab:
                columns.update(text_answer=("answer_loss", "n_answer_tokens"),
                               text_other=("other_loss", "n_other_tokens"))
            at = 0
            for g in groups:
                n = len(t_idx[g])
                for kind, (value, weight) in columns.items():
                    if n:
                        ev.setdefault(kind, {})[g] = (t_idx[g], np.nan_to_num(tab[value][at:at + n]),
                                                      tab[weight][at:at + n].astype(np.float64))
                at += n
        return ev

    cache: dict[str, Evaluation | None] = {}

    def evaluate_ablated(targets: Targets, groups: Sequence[str], what: str) -> Evaluation | None:
        """evaluate(groups) under ``intervene(model, targets)``, each (ablation, group) once (the
        dose "all" is the main targets; a draw can repeat). None when the targets leave no valid
        routing (e.g. a layer with fewer than top_k selectable experts): reported, not fatal."""
        key = json.dumps(targets.to_dict(), sort_keys=True)
        have = cache.setdefault(key, {})
        if have is None:
            return None
        todo = [g for g in groups if g not in have.get("question", {})]
        if todo:
            try:
                with intervene(model, targets):
                    new = evaluate(todo)
            except MoetraceError as exc:
                warnings.warn(f"{what} not evaluated: {exc}", stacklevel=3)
                cache[key] = None
                return None
            for kind, per_group in new.items():
                have.setdefault(kind, {}).update(per_group)
        return {kind: {g: v[g] for g in groups if g in v} for kind, v in have.items()}

    # 1. base evaluation, chance and the answer-blind baseline
    base = evaluate(group_list)
    blind = None
    if scoring == "answer":
        mc = multiple_choice_accuracy(model, tokenizer, questions, answer_blind=True, by=(), batch_size=batch_size,
                                      progress=False)
        blind = {g: mc.table["correct"][q_idx[g]] for g in group_list}
    base_rows = _base_rows(base, blind, scoring)
    write_results({c: np.asarray([r[c] for r in base_rows]) for c in BASE_COLUMNS}, out / "base.csv")
    testable = {r["group"] for r in base_rows if r["testable"]}

    # 2. the routing that selects the targets: held-out texts, captured and counted by group
    trace = out / "trace.zarr"
    if trace.exists():
        shutil.rmtree(trace)
    if select_texts is None:
        warnings.warn("select_texts not given: the targets are selected on the routing of the evaluated questions' "
                      "contexts, so selection and evaluation share their items", stacklevel=2)
        routed = [{"text": answer_context(q), **{k: str(q[k]) for k in labels}} for q in questions]
        selection_source = f"the {len(questions)} evaluated questions' contexts (not held out)"
    else:
        evaluated = {str(q.get("context") or q["question"]) for q in questions} | {t["text"] for t in texts or []}
        shared = [i for i, t in enumerate(select_texts) if t["text"] in evaluated]
        if shared:
            raise MoetraceError(f"select_texts: text {shared[0]} is also an evaluated item; expected texts disjoint "
                                "from the evaluated questions and texts")
        routed = list(select_texts)
        selection_source = f"{len(routed)} held-out texts, disjoint from the evaluated items"
    perplexity(model, tokenizer, routed, by=labels, batch_size=batch_size, progress=False, store=trace,
               capture_fn=capture)
    store = TraceStore.open(trace)
    from moetrace.report import REPORT_STATS

    from moetrace.kernels.counting import STATS

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
    counted = {_group_name(v): dict(zip(by, v)) for v in metrics.group_names(counts)}
    absent = [g for g in group_list if g not in counted]
    if absent:
        raise MoetraceError(f"select_texts: expected texts of every evaluated group, none of group {absent[0]!r}")

    # 3-4. targets, their coverage, ablated evaluations, matched random draws
    routes = {m: RouteTable(counts, m) for m in methods}
    selections = {(m, g): metrics.specialized(counts, m, counted[g], threshold=thresholds.get(m))
                  for m in methods for g in group_list}
    exclude = {m: set().union(*(_selection_set(selections[(m, g)]) for g in group_list)) for m in methods}
    boots = {kind: PairedBootstrap({g: len(v[0]) for g, v in per.items()}, n_boot=N_BOOT, seed=seed)
             for kind, per in base.items()}
    rows: list[dict[str, Any]] = []
    items: list[dict[str, np.ndarray]] = []
    dose_rows: list[dict[str, Any]] = []
    targets_dir = out / "targets"
    targets_dir.mkdir(exist_ok=True)
    jobs = [(m, g) for m in methods for g in group_list]
    for method, group in tqdm(jobs, desc="ablations", disable=not progress, unit="target"):
        sel, table = selections[(method, group)], routes[method]
        real = Targets.from_specialized(method, sel, mask_mode=mask_mode)
        real.save_bare(targets_dir / f"{group.replace('/', '_')}_{method}.json", method)
        target_cov = table.coverage_of(group, sel.layer, sel.items)
        common = {"targeted_group": group, "target_coverage": target_cov, "scoring": scoring}
        if len(sel) == 0:
            warnings.warn(f"{method}: no item is specialized in {group} at threshold {sel.threshold:g} (the largest "
                          f"that selects any is {sel.max_threshold:.3g}); nothing to ablate, no effect reported",
                          stacklevel=2)
            rows.append(_row({"method": method, "seed": -1, "evaluated_group": group, "n_items": 0,
                              "coverage": 0.0, "in_band": True, **common}, base, None, group, None, seed))
            continue
        ev = evaluate_ablated(real, group_list, f"{method} targets of {group}")
        for evaluated in group_list:
            variant = {"method": method, "seed": -1, "evaluated_group": evaluated, "n_items": len(sel),
                       "coverage": table.coverage_of(evaluated, sel.layer, sel.items), "in_band": True, **common}
            rows.append(_row(variant, base, ev, evaluated, boots, seed))
            items += _item_rows(variant, base, ev, evaluated)
        draw_seed = [seed, METHODS.index(method), group_list.index(group)]
        draws = matched_random(sel, table, group, exclude[method], n_random, draw_seed, band=band,
                               mask_mode=mask_mode)
        if not draws:
            warnings.warn(f"{method}: no random draw for the targets of {group}: every route the trace takes at their "
                          "layers is some group's target; targeted - random is not measured there", stacklevel=2)
        elif len(draws) < n_random:
            warnings.warn(f"{method}: only {len(draws)} distinct random draw(s) exist for the {len(sel)} targets of "
                          f"{group}: few routes are left that no group's targets use, so targeted - random rests on "
                          f"{len(draws)} draw(s) there", stacklevel=2)
        for j, draw in enumerate(draws):
            ev = evaluate_ablated(draw.targets, [group], f"random draw {j} for the {method} targets of {group}")
            variant = {"method": f"random:{method}", "seed": j, "evaluated_group": group,
                       "n_items": sum(draw.targets.n_rules().values()), "coverage": draw.coverage,
                       "in_band": draw.in_band, **common}
            rows.append(_row(variant, base, ev, group, None, seed))
            items += _item_rows(variant, base, ev, group)
        if dose_list is not None:
            dose_rows += _dose_rows(sel, table, group, group_list, exclude[method], dose_list, modes, draws,
                                    dose_random, draw_seed, band, evaluate_ablated, base, boots, seed)

    for measure in ("drop", "loss_increase"):
        adjusted = holm([r[f"{_ci_prefix(measure)}_p_value"] for r in rows])
        for r, p_holm in zip(rows, adjusted):
            r[f"{_ci_prefix(measure)}_p_holm"] = p_holm
    table = {col: np.asarray([r[col] for r in rows]) for col in RESULT_COLUMNS}
    write_results(table, out / "results.csv")
    if dose_list is not None:
        write_results({col: np.asarray([r[col] for r in dose_rows]) for col in DOSE_COLUMNS},
                      out / "dose_response.csv")
    item_table = {col: np.concatenate([np.asarray(block[col]) for block in items]) if items else np.zeros(0)
                  for col in ITEM_COLUMNS}
    write_results(item_table, out / "items.csv")
    summary = {"scoring": scoring, "n_random": n_random, "coverage_band": [1 / band, band],
               "selection": selection_source, "base": {r["group"]: r for r in base_rows},
               **summarize(table, item_table, seed=seed, testable=testable)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return table


def _row(variant: Mapping[str, Any], base: Evaluation, ev: Evaluation | None, group: str,
         boots: Mapping[str, PairedBootstrap] | None, seed: int) -> dict[str, Any]:
    """One results.csv row: the variant's measures on ``group`` (with paired intervals when
    ``boots`` is given); NaN where it was not evaluated (or nothing was measured)."""
    nan = float("nan")
    row: dict[str, Any] = dict(variant)
    q = base["question"][group]
    row.update(base_accuracy=float(q[1].mean()), n_questions=len(q[0]),
               n_texts=len(base["text"][group][0]) if group in base.get("text", {}) else 0,
               base_loss=_weighted(*base["text"][group][1:]) if group in base.get("text", {}) else nan,
               ablated_accuracy=nan, ablated_loss=nan)
    for measure, kind in MEASURES.items():
        prefix = _ci_prefix(measure)
        row.update({measure: nan, f"{prefix}_ci_low": nan, f"{prefix}_ci_high": nan, f"{prefix}_p_value": nan})
        if ev is None or group not in base.get(kind, {}) or group not in ev.get(kind, {}):
            continue
        ids, b, w = base[kind][group]
        a = ev[kind][group][1]
        if kind == "question":
            row["ablated_accuracy"] = float(a.mean())
        if kind == "text":
            row["ablated_loss"] = _weighted(a, w)
        if boots is None:
            row[measure] = _weighted(item_harm(kind, b, a), w)
            continue
        boot = boots["question" if kind == "question" else "text"]
        if kind == "question":
            effect = paired_effect(b.astype(bool), a.astype(bool), boot=boot, name=group, seed=seed)
        else:
            effect = paired_effect(a, b, w, boot=boot, name=group, seed=seed)
        row.update({measure: effect.estimate, f"{prefix}_ci_low": effect.ci_low, f"{prefix}_ci_high": effect.ci_high,
                    f"{prefix}_p_value": effect.p_value})
    return row


def _item_rows(variant: Mapping[str, Any], base: Evaluation, ev: Evaluation | None,
               group: str) -> list[dict[str, np.ndarray]]:
    """items.csv rows of one (variant, evaluated group), one block per kind."""
    blocks = []
    for kind in MEASURES.values():
        if ev is None or group not in base.get(kind, {}) or group not in ev.get(kind, {}):
            continue
        ids, b, w = base[kind][group]
        blocks.append({"kind": np.full(len(ids), kind),
                       **{k: np.full(len(ids), variant[k]) for k in ("method", "targeted_group", "seed",
                                                                    "evaluated_group")},
                       "item": ids, "base": b, "ablated": ev[kind][group][1], "weight": w})
    return blocks


def write_results(table: Mapping[str, np.ndarray], path: str | Path) -> Path:
    """Write a table (dict of equal-length arrays) as CSV with pyarrow."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    path = Path(path)
    pacsv.write_csv(pa.table({k: np.asarray(v) for k, v in table.items()}), path)
    return path


# ----------------------------------------------------------------------------- the headline


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


def _dose_rows(selection: metrics.Selection, routes: RouteTable, group: str, groups: Sequence[str], exclude: set,
               doses, modes, main_draws: list[Draw], n_random: int, draw_seed: list[int], band: float,
               evaluate_ablated: Callable, base: Evaluation, boots, seed: int) -> list[dict[str, Any]]:
    """dose_response.csv rows of one targeted group and method: for each dose and mode the n most
    specialized items evaluated on every group, and ``n_random`` draws matched to their coverage
    of the group's routes evaluated on the group (the dose "all" in the main mask mode reuses the
    main draws)."""
    rows = []
    for n, sub in dose_ladder(selection, doses):
        dose = "all" if "all" in doses and n == len(selection) else str(n)
        target_cov = routes.coverage_of(group, sub.layer, sub.items)
        for mode in modes:
            real = Targets.from_specialized(routes.method, sub, mask_mode=mode)
            main = main_draws[0].targets.mask_mode if main_draws else None
            if n == len(selection) and mode == main:
                draws = main_draws[:n_random]
            else:
                draws = matched_random(sub, routes, group, exclude, n_random, [*draw_seed, n, list(MASK_MODES).index(mode)],
                                       band=band, mask_mode=mode)
            variants = [(False, -1, real, [*groups], target_cov, True)]
            variants += [(True, j, d.targets, [group], d.coverage, d.in_band) for j, d in enumerate(draws)]
            for is_random, j, targets, evaluated_groups, cov, in_band in variants:
                ev = evaluate_ablated(targets, evaluated_groups, f"dose {n} ({mode}) of the {routes.method} "
                                                                 f"targets of {group}")
                for evaluated in evaluated_groups:
                    r = _row({}, base, ev, evaluated, None if is_random else boots, seed)
                    rows.append({"method": routes.method, "mode": mode, "targeted_group": group,
                                 "evaluated_group": evaluated, "n_ablated": n, "dose": dose, "is_random": is_random,
                                 "seed": j, "coverage": cov if evaluated == group
                                 else routes.coverage_of(evaluated, sub.layer, sub.items),
                                 "target_coverage": cov, "in_band": in_band, "accuracy": r["ablated_accuracy"],
                                 "drop": r["drop"], "drop_ci_low": r["drop_ci_low"], "drop_ci_high": r["drop_ci_high"],
                                 "drop_p_value": r["drop_p_value"], "loss": r["ablated_loss"],
                                 "loss_increase": r["loss_increase"], "loss_ci_low": r["loss_ci_low"],
                                 "loss_ci_high": r["loss_ci_high"], "loss_p_value": r["loss_p_value"]})
    return rows


