"""One self-contained HTML report of a trace store or an experiment run directory.

    write_report("demo_out", "demo_out/report.html")          # a run: trace.zarr [+ counts.zarr, results.csv]
    write_report("trace.zarr", "report.html", title="OLMoE")  # a bare trace store

The file needs nothing but itself: plots are PNGs (matplotlib, Agg) inlined as base64
``data:`` URIs, the style sheet is inline, there is no script, and a Content-Security-Policy
``<meta>`` forbids every load other than ``data:`` images, so a browser fetches nothing.
Every text put into the page goes through :func:`html.escape`.

Sections are the objects of :data:`SECTIONS` (id, title, the data each needs, a render
function), in page order; the table of contents, :data:`REPORT_STATS` (the count statistics a
run directory's ``counts.zarr`` should hold) and the tests derive from that list. Sections whose
needs are count statistics are always shown (with a note when a statistic was not counted); the
others appear when their data is there:

- *Ablation experiment* (``results.csv``) and *Chosen targets and their coverage* (its
  ``coverage`` column and ``targets/``); *Domain separation*, *Expert usage*, *Specialists*,
  *Top paths*, *Pairs*, *Co-activation*, *Stickiness* (counts); *Router metrics* and
  *Languages vs domains* (:mod:`moetrace.analysis` on the counts); *Router decisiveness*
  (``routing/probs`` in the store); *Router statistics*, *Expert similarity*, *2-D map*,
  *Expert profiles*, *Steering* (files the analysis commands wrote into ``RUN/analysis/``);
  *Trace store* (:meth:`moetrace.store.TraceStore.info` and what the counts cover).

Every figure comes from a public function of :mod:`moetrace.figures`.

A store without labels is one group, ``all``. Group names are the label values joined by
``/`` (``math/en``), as in the experiment's ``results.csv``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from moetrace import figures, metrics
from moetrace.analysis import ANALYSES
from moetrace.counting import count, load_counts
from moetrace.errors import MoetraceError
from moetrace.figures import LAYERS_PER_FIGURE, MEASURES
from moetrace.intervene import describe_intervention
from moetrace.kernels.counting import STATS
from moetrace.sections import (Context, Section, escape, fmt, group_matrix, html_table, img, note, section_html,
                               size)
from moetrace.store import TraceStore

#: Columns ``results.csv`` must have (the experiment's interface).
RESULT_COLUMNS = ("method", "targeted_group", "evaluated_group", "base_accuracy", "ablated_accuracy")
#: Numeric columns of ``results.csv`` the report reads when present (``nan`` allowed).
NUMERIC_RESULT_COLUMNS = ("base_accuracy", "ablated_accuracy", "drop", "base_loss", "ablated_loss",
                          "loss_increase", "coverage", "n_items", "seed")
#: Statistics counted when a run directory has no ``counts.zarr`` or the source is a bare store.
#: Paths listed per group.
TOP_PATHS = 10

# Only data: images and the inline style sheet may load; no script, no network.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .2em .6em; text-align: right; }
th { background: #f3f3f3; } td.t, th.t { text-align: left; }
img { max-width: 100%; display: block; margin: .6em 0; }
.note { color: #666; font-size: .9em; }
nav a { margin-right: 1em; }
"""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def load_results(results: str | Path | pd.DataFrame) -> pd.DataFrame:
    """An experiment's results table, checked; adds ``drop`` (base - ablated) when absent.

    results: a CSV path or a DataFrame with at least the columns of :data:`RESULT_COLUMNS`
    (``method``, ``targeted_group``, ``evaluated_group`` str; ``base_accuracy``,
    ``ablated_accuracy`` float); random-control rows have a ``method`` starting with
    ``random``. Group names are read as written (a group called ``NA`` stays ``NA``); the
    columns of :data:`NUMERIC_RESULT_COLUMNS` present become float64 (``nan`` / empty: NaN).
    Returns a DataFrame, one row per input row, group/method columns as str.
    """
    name = "results"
    if not isinstance(results, pd.DataFrame):
        path = Path(results)
        name = str(path)
        if not path.is_file():
            raise MoetraceError(f"{path}: no such results file")
        try:
            results = pd.read_csv(path, dtype={c: str for c in ("method", "targeted_group", "evaluated_group")},
                                  keep_default_na=False, na_values=[""])
        except (ValueError, pd.errors.ParserError) as exc:
            raise MoetraceError(f"{path}: not a readable CSV results table ({exc})") from None
    missing = [c for c in RESULT_COLUMNS if c not in results.columns]
    if missing:
        raise MoetraceError(f"{name}: expected columns {list(RESULT_COLUMNS)}, missing {missing} "
                            f"(has {list(results.columns)})")
    df = results.copy()
    for col in ("method", "targeted_group", "evaluated_group"):
        df[col] = df[col].astype(str)
    for col in NUMERIC_RESULT_COLUMNS:
        if col in df.columns:
            try:
                df[col] = df[col].astype(np.float64)  # parses "nan" / "inf", which pd.to_numeric does not
            except (ValueError, TypeError):
                raise MoetraceError(f"{name}: column {col!r} must be numeric") from None
    if "drop" not in df.columns:
        df["drop"] = df["base_accuracy"] - df["ablated_accuracy"]
    return df


def _load(source: str | Path) -> tuple[TraceStore, xr.Dataset, str, Path | None]:
    """(store, counts, where the counts came from, results.csv path or None) of a store or run dir."""
    source = Path(source)
    if not source.exists():
        raise MoetraceError(f"{source}: no such trace store or run directory")
    results_csv = None
    counts_path = None
    if (source / "trace.zarr").is_dir():
        store = TraceStore.open(source / "trace.zarr")
        if (source / "counts.zarr").exists():
            counts_path = source / "counts.zarr"
        if (source / "results.csv").is_file():
            results_csv = source / "results.csv"
    else:
        if not (source / "zarr.json").is_file():
            raise MoetraceError(f"{source}: expected a trace store or a run directory holding trace.zarr, got neither")
        store = TraceStore.open(source)
    if counts_path is not None:
        counts = load_counts(counts_path)
        origin = f"loaded from {counts_path}"
    else:
        # a store without rank order (moetrace.store.RANK_ORDERS) gets no top-1 statistics: their sections drop out
        stats = [n for n in REPORT_STATS if store.rank_order == "ranked" or not STATS[n].needs_rank_order]
        counts = count(store, stats=stats, by=store.label_names, progress=False)
        by = ", ".join(store.label_names) or "nothing"
        origin = f"counted now from the store ({', '.join(stats)} by {by})"
    metrics.check_counts(counts)
    return store, counts, origin, results_csv


# ---------------------------------------------------------------------------------------------
# Sections: one object each; write_report, the table of contents, the statistics a run
# directory must contain (REPORT_STATS) and the report test's section list derive from SECTIONS.
# ---------------------------------------------------------------------------------------------


def _not_counted(stats: Sequence[str], rank_order: str = "ranked") -> str:
    return " ".join(
        f"{s} cannot be counted: the trace records each token's set of experts, not their rank order."
        if rank_order != "ranked" and STATS[s].needs_rank_order
        else f"{s} {'were' if s.endswith('s') else 'was'} not counted (count with --stats {s})." for s in stats)


def _render_separation(ctx: Context) -> str:
    counts = ctx.counts
    ranking = metrics.layer_ranking(counts)
    ent = metrics.entropy(counts)
    h = group_matrix(ent["entropy"].transpose(..., "layer"), counts)  # [G, L]
    layers = counts["layer"].values.tolist()
    rows = [[layer, ranking["chi2"].values[i], ranking["dof"].values[i], ranking["p_value"].values[i],
             ranking["avg_variance"].values[i], bool(ranking["significant"].values[i]), float(np.nanmean(h[:, i]))
             if np.any(~np.isnan(h[:, i])) else float("nan")]
            for i, layer in enumerate(layers)]
    body = (note("Seed 002's test of independence of group and expert on each layer's group x expert count "
                 "matrix (all top-k ranks), and the Shannon entropy of each group's expert usage.")
            + img(figures.separation(counts), "chi-square, mean variance and entropy by layer")
            + html_table(["layer", "chi2", "dof", "p value", "mean variance", "significant", "mean entropy (bits)"],
                         rows))
    if ctx.best_layer() is not None:
        body += note(f"Most domain-separating layer (largest chi-square): {ctx.best_layer()}.")
    return body


def _render_usage(ctx: Context) -> str:
    layers = ctx.counts["layer"].values.tolist()
    imgs = [img(figures.usage_heatmaps(ctx.counts, layers[i:i + LAYERS_PER_FIGURE]),
                f"expert usage heatmaps, layers {layers[i]} to {layers[min(i + LAYERS_PER_FIGURE, len(layers)) - 1]}")
            for i in range(0, len(layers), LAYERS_PER_FIGURE)]
    return (note("Percent of each group's expert selections (all top-k ranks) that go to each expert; rows: "
                 f"groups, columns: experts (uniform: {100.0 / ctx.counts.sizes['expert']:.3g}%).") + "".join(imgs))


def _render_specialists(ctx: Context) -> str:
    layer = ctx.best_layer()
    if layer is None:
        return note("No layer has expert counts.")
    counts = ctx.counts
    var = metrics.expert_variation(counts, layer)
    cv = var["cv"].values
    if np.all(np.isnan(cv)):
        return note(f"Layer {layer}: the coefficient of variation needs at least two groups.")
    gdims = metrics.group_dims(counts)
    experts = var["expert"].values
    preferred = ["/".join(str(var[f"preferred_{label}"].values[i]) for label in gdims) or "all"
                 for i in range(experts.size)]
    rows = []
    for role, mask in (("specialist", var["specialist"].values), ("generalist", var["generalist"].values)):
        idx = np.flatnonzero(mask)
        idx = idx[np.argsort(-cv[idx], kind="stable")]
        rows += [[role, int(experts[i]), cv[i], preferred[i], var["usage_pct"].values[i]] for i in idx]
    return (note(f"Layer {layer} (largest chi-square). Coefficient of variation of each expert's counts across "
                 f"groups; specialists above the 75th percentile ({var.attrs['q75']:.3g}), generalists below the "
                 f"25th ({var.attrs['q25']:.3g}). Usage: percent of the preferred group's routing at this layer "
                 "that goes to the expert.")
            + img(figures.specialists(counts, layer), f"coefficient of variation per expert at layer {layer}")
            + html_table(["role", "expert", "cv", "preferred group", "usage % of the group"], rows, text_cols=1))


def _top_items(ctx: Context, var: str, dims: tuple[str, str], fmt: str) -> list[list]:
    """Rows (group, layer, item, count, share %, in group %) of each group's TOP_PATHS most frequent items."""
    counts = ctx.counts
    arr = group_matrix(counts[var].transpose(..., "layer", *dims), counts)  # [G, L, E, E]
    shape = arr.shape[1:]
    flat = arr.reshape(arr.shape[0], -1)
    overall = flat.sum(axis=0)
    layers = counts["layer"].values
    a_ids, b_ids = counts[dims[0]].values, counts[dims[1]].values
    rows = []
    for g, name in enumerate(ctx.groups):
        total = flat[g].sum()
        if total == 0:
            continue
        order = np.argsort(-flat[g], kind="stable")[:TOP_PATHS]
        order = order[flat[g][order] > 0]
        li, ai, bi = np.unravel_index(order, shape)
        for j, item in enumerate(order):
            rows.append([name, int(layers[li[j]]), fmt.format(a_ids[ai[j]], b_ids[bi[j]]), int(flat[g][item]),
                         100.0 * flat[g][item] / total, 100.0 * flat[g][item] / overall[item]])
    return rows


def _render_paths(ctx: Context) -> str:
    rows = _top_items(ctx, "paths", ("prev_expert", "expert"), "{} -> {}")
    if not rows:
        return note("No paths were counted (a single recorded layer?).")
    body = note(f"The {TOP_PATHS} most frequent paths of each group: top-1 expert at the previous recorded layer "
                "-> top-1 expert at this layer. Share: of the group's paths over all layers; in group: the "
                "fraction of all groups' uses of the path that come from this group.")
    if ctx.counts.sizes["layer"] > 1:
        body += img(figures.paths(ctx.counts), "top-1 transition matrices between consecutive layers")
    return body + html_table(["group", "layer", "path", "count", "share %", "in group %"], rows, text_cols=3)


def _render_pairs(ctx: Context) -> str:
    rows = _top_items(ctx, "pairs", ("first", "second"), "({}, {})")
    if not rows:
        return note("No pairs were counted.")
    return (note(f"Ordered (rank-0, rank-1) expert pairs, seed 000's third target method: the {TOP_PATHS} most "
                 "frequent pairs of each group (share: of the group's pairs over all layers; in group: the "
                 "fraction of all groups' uses of the pair that come from this group), and per layer the pair "
                 "matrix over all groups.")
            + img(figures.pairs(ctx.counts), "rank-0 x rank-1 pair matrices")
            + html_table(["group", "layer", "pair", "count", "share %", "in group %"], rows, text_cols=3))


def _render_coactivation(ctx: Context) -> str:
    co = metrics.coactivation(ctx.counts)
    values = co.values.copy()
    rows = []
    for li, layer in enumerate(ctx.counts["layer"].values.tolist()):
        m = values[li].copy()
        np.fill_diagonal(m, np.nan)
        if np.all(np.isnan(m)):
            continue
        i, j = np.unravel_index(np.nanargmax(m), m.shape)
        rows.append([layer, f"{i} -> {j}", m[i, j], float(np.nanmean(m))])
    return (note("OLMoE's co-activation N(Ei, Ej) / N(Ei): of the tokens selecting expert i (row), the fraction "
                 "that also select expert j, over all groups. Table: the strongest pair per layer and the mean.")
            + img(figures.coactivation(ctx.counts), "co-activation matrices by layer")
            + html_table(["layer", "strongest i -> j", "N(Ei,Ej)/N(Ei)", "mean"], rows, text_cols=2))


def _render_stickiness(ctx: Context) -> str:
    ds = metrics.stickiness(ctx.counts)
    s = group_matrix(ds["stickiness"].transpose(..., "layer"), ctx.counts)
    mean = float(np.nanmean(s)) if np.any(~np.isnan(s)) else float("nan")
    return (note("Probability that the next token of the same sequence keeps the top-1 expert, per group and "
                 f"layer; mean {fmt(mean)} against the random baseline 1/E = {float(ds['baseline']):.3g}.")
            + img(figures.stickiness(ctx.counts), "stickiness by layer"))


def _render_experiment(ctx: Context) -> str:
    df = ctx.results
    groups = ctx.groups
    methods = sorted({m for m in df["method"] if not m.startswith("random")})
    if "loss_increase" not in df.columns and {"base_loss", "ablated_loss"} <= set(df.columns):
        df = df.assign(loss_increase=df["ablated_loss"] - df["base_loss"])
    measures = [m for m in MEASURES if m in df.columns and np.any(~np.isnan(df[m].to_numpy(dtype=np.float64)))]
    parts = []
    if ctx.has("base.csv"):
        base = _read_run_csv(ctx.run_dir / "base.csv")
        base["group"] = base["group"].astype(str)
        rows = [[r.group, r.n_questions, f"{r.base_accuracy:.3f} [{r.base_ci_low:.3f}, {r.base_ci_high:.3f}]",
                 r.chance, r.blind_accuracy, "yes" if r.testable else "NOT TESTABLE", r.base_loss]
                for r in base.itertuples(index=False)]
        scoring = str(base["scoring"].iloc[0]) if len(base) else "answer"
        how = ("each option scored by the summed log-likelihood of its answer text after the question"
               if scoring == "answer" else "the logit of its answer letter")
        parts.append("<h3>Base accuracy against chance and the answer-blind baseline</h3>"
                     + note(f"Scoring: {scoring} ({how}). "
                            "Answer-blind: the same options scored with the question removed, what the model gets "
                            "from its prior over answers alone. A group whose base accuracy's 95% Clopper-Pearson "
                            "interval is not above both chance and the answer-blind accuracy is not testable on "
                            "accuracy (a model cannot lose a skill it does not show) and is left out of the "
                            "accuracy headline.")
                     + img(figures.base_accuracy(base), "base accuracy per group beside chance and answer-blind")
                     + html_table(["group", "questions", "base accuracy [95%]", "chance", "answer-blind", "testable",
                                   "base loss"], rows, text_cols=3))
    if ctx.has("summary.json"):  # the experiment's own headline, with its draw tests
        summary = json.loads((ctx.run_dir / "summary.json").read_text())
    else:
        from moetrace.results import summarize  # a results table alone: point estimates, no intervals

        summary = summarize({c: df[c].to_numpy() for c in df.columns})
    headline = []
    for method in methods:
        for measure, e in summary.get(method, {}).items():
            if measure not in EXPERIMENT_MEASURES:
                continue
            d = e["targeted_minus_random"]
            p = "n/a" if "p_value" not in d else (f"{fmt(d['p_value'], 3)}"
                                                 + (f" (Holm {fmt(d['p_holm'], 3)})" if "p_holm" in d else ""))
            headline.append([method, EXPERIMENT_MEASURES[measure], _effect(e["targeted"]), _effect(e["off_target"]),
                             _effect(e["random"]), _effect(d), d.get("n_random", 0), p,
                             _ratio(e["selectivity"]), ", ".join(e.get("not_testable", [])) or "-",
                             ", ".join(e.get("no_targets", [])) or "-"])
    figs = []
    for measure in measures:
        figs.append(f"<h4>{escape(MEASURES[measure])}</h4>")
        for method in methods:
            fig = figures.ablation_matrix(df, method, measure, None, groups)
            figs.append(img(fig, f"{measure} matrix of {method}"))
    selection = escape(summary.get("selection", "the trace in this directory"))
    primary = "; ".join(f"{t['method']} {EXPERIMENT_MEASURES[t['measure']]}: p {fmt(t['p_value'], 3)}, Holm "
                        f"{fmt(t['p_holm'], 3)}" for t in summary.get("primary_tests", []))
    real = df[~df["method"].str.startswith("random")].sort_values(["method", "targeted_group", "evaluated_group"])
    result_columns, result_rows = _results_table(real)
    return ("".join(parts)
            + "<h3>Per method</h3>"
            + note(f"Targets selected on {selection}. targeted: mean over targeted groups of the effect on that "
                   "group; off-target: of the mean effect on the other groups; random: of the mean over the random "
                   "draws (as many real routes per layer, used by no group's targets, matched on the targeted "
                   "group's traffic where possible, see Targets); targeted - random with its two-level interval "
                   "(draws and items resampled); p: rank of the targeted effect among the draws, pooled over "
                   "groups (one-sided); n: draws per group. In brackets: 95% intervals (paired bootstrap over "
                   "items for targeted and off-target). Primary tests (Holm-adjusted as one family): "
                   f"{escape(primary) or 'none'}. Every other p-value is secondary. No targets: groups where no "
                   "item reached the method's selection threshold; the method's effects leave them out.")
            + html_table(["method", "measure", "targeted", "off-target", "random (mean of draws)", "targeted - random",
                          "n", "p vs random", "targeted / off-target", "not testable",
                          "no targets (nothing ablated)"], headline, text_cols=11)
            + "<h3>Targeted x evaluated groups</h3>"
            + note("Each cell: the effect on the evaluated group (column) of ablating the routes specialized in the "
                   "targeted group (row). One colour scale per measure; a cell is coloured only where its 95% "
                   "interval excludes 0 (pale grey: the interval contains 0), and * marks a cell significant "
                   "after Holm over the table.")
            + "".join(figs)
            + "<h3>Results</h3>"
            + note("results.csv's rows of the targeted ablations: every measure with its 95% paired interval, its "
                   "item-level p-value (McNemar for accuracy, sign-flip for loss) and that p-value Holm-adjusted "
                   "over the whole table. The random draws' rows are in results.csv.")
            + html_table(result_columns, result_rows, text_cols=3))


def _results_table(real: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """The targeted rows of results.csv as one table of consistently formatted text: accuracies and
    losses to 3 decimals, effects signed with their 95% interval, p-values (Holm) to 2 digits."""
    def num(v, spec: str) -> str:
        return "-" if v is None or v != v else format(float(v), spec)

    def effect(r, measure: str, prefix: str) -> str:
        if measure not in r or r[measure] != r[measure]:
            return "-"
        ci = (f" [{num(r.get(f'{prefix}_ci_low'), '+.3f')}, {num(r.get(f'{prefix}_ci_high'), '+.3f')}]"
              if f"{prefix}_ci_low" in r else "")
        return num(r[measure], "+.3f") + ci

    def p(r, prefix: str) -> str:
        if f"{prefix}_p_value" not in r:
            return "-"
        holm = f" ({num(r.get(f'{prefix}_p_holm'), '.2g')})" if f"{prefix}_p_holm" in r else ""
        return num(r[f"{prefix}_p_value"], ".2g") + holm

    has_loss = any(c in real.columns and pd.to_numeric(real[c], errors="coerce").notna().any()
                   for c in ("base_loss", "loss_increase"))
    columns = ["method", "targeted group", "evaluated group", "base accuracy", "ablated accuracy",
               "accuracy drop [95%]", "drop p (Holm)"]
    if has_loss:
        columns += ["base loss", "ablated loss", "loss increase [95%]", "loss p (Holm)"]
    columns += ["coverage", "items"]
    rows = []
    for r in real.to_dict("records"):
        row = [r["method"], r["targeted_group"], r["evaluated_group"], num(r.get("base_accuracy"), ".3f"),
               num(r.get("ablated_accuracy"), ".3f"), effect(r, "drop", "drop"), p(r, "drop")]
        if has_loss:
            row += [num(r.get("base_loss"), ".3f"), num(r.get("ablated_loss"), ".3f"),
                    effect(r, "loss_increase", "loss"), p(r, "loss")]
        items = r.get("n_items")
        row += [num(r.get("coverage"), ".1%"), "-" if items is None or items != items else f"{int(items):,}"]
        rows.append(row)
    return columns, rows


EXPERIMENT_MEASURES = {"drop": "accuracy drop", "loss_increase": "loss increase",
                       "answer_loss_increase": "loss on answer tokens", "other_loss_increase": "loss on other tokens"}


def _read_run_csv(path: Path) -> pd.DataFrame:
    """A table the experiment wrote, group and method names kept as text ("2024", "NA" stay names)."""
    text = {"kind", "method", "mode", "targeted_group", "evaluated_group", "dose"}
    columns = pd.read_csv(path, nrows=0).columns
    missing = {c: ["", "nan", "NaN", "NA"] for c in columns if c not in text}  # numbers: pyarrow writes NaN as nan
    return pd.read_csv(path, dtype={c: str for c in text if c in columns}, keep_default_na=False,
                       na_values=missing)


def _effect(e: dict) -> str:
    if e.get("estimate") is None or e["estimate"] != e["estimate"]:
        return "n/a"
    if "ci_low" not in e:
        return f"{e['estimate']:+.3f}"
    return f"{e['estimate']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]"


def _ratio(r: dict) -> str:
    if r.get("defined") is False or r.get("estimate") is None or r["estimate"] != r["estimate"]:
        return "n/a"
    if "ci_low" not in r:
        return f"{r['estimate']:.2f}"
    return f"{r['estimate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"


def _render_dose_response(ctx: Context) -> str:
    dose = _read_run_csv(ctx.run_dir / "dose_response.csv")
    parts = [note("The effect on each targeted group of ablating its n most specialized items (n: 1, 8, ..., all, "
                  "by their share of samples from the group), against the share of the group's routes those items "
                  "cover (x). Dots: the targets, with their 95% paired interval over items; crosses: the mean of "
                  "the random draws matched to that coverage (as many real routes per layer, used by no group's "
                  "targets), with the 95% t-interval of that mean over draws. A draw that could not be matched "
                  "lies at its own coverage, left of the targets.")]
    if "target_coverage" not in dose.columns:
        return note("This dose_response.csv predates the coverage axis; rerun the experiment to plot it.")
    for measure in ("drop", "loss_increase"):
        if measure in dose.columns and dose[measure].notna().any():
            parts.append(f"<h3>{escape(MEASURES[measure])}</h3>"
                         + img(figures.dose_response(dose, measure), f"dose-response of the {measure}"))
    own = dose[dose["targeted_group"] == dose["evaluated_group"]]
    table = (own.groupby(["method", "mode", "targeted_group", "dose", "is_random"], sort=True)
             .agg(coverage=("target_coverage", "mean"), draws=("seed", "nunique"), in_band=("in_band", "mean"),
                  drop=("drop", "mean"), loss_increase=("loss_increase", "mean")).reset_index())
    rows = [[r.method, r.mode, r.targeted_group, str(r.dose), "random draws" if r.is_random else "targets",
             r.coverage * 100, r.draws if r.is_random else "-", r.in_band if r.is_random else "-", r.drop,
             r.loss_increase] for r in table.itertuples(index=False)]
    return "".join(parts) + html_table(["method", "mode", "targeted group", "dose", "ablated", "coverage %", "draws",
                                        "in band", "accuracy drop", "loss increase"], rows, text_cols=5)


def _render_generated(ctx: Context) -> str:
    counts = ctx.by_generated()
    ent = metrics.entropy(counts)["entropy"]
    rows = [[str(kind), int(counts["tokens"].sel(generated=kind)),
             *[float(ent.sel(generated=kind, layer=layer)) for layer in counts["layer"].values]]
            for kind in counts["generated"].values]
    return (note("Expert usage of the prompt tokens and of the tokens the model generated, counted separately "
                 "(`moetrace count --by generated`); entropy of each kind's expert distribution per layer, in bits.")
            + img(figures.usage_heatmaps(counts), "expert usage of prompt and generated tokens")
            + html_table(["tokens", "count", *[f"layer {layer}" for layer in counts["layer"].values]], rows))


def _render_compare(ctx: Context) -> str:
    summary = json.loads((ctx.run_dir / "compare.json").read_text())
    measures = [m for m in ("top1_agreement", "topk_overlap", "jaccard", "weight_rank_corr")
                if m in summary["layers"][0]]
    layer_rows = [[e["layer"], *[float("nan") if e[m] is None else e[m] for m in measures]] for e in summary["layers"]]
    worst = [[w["seq"], w["pos"], w["token_id"], w["layers_differing"]] for w in summary["worst_tokens"]]
    return (note(f"{summary['a']} vs {summary['b']}: {summary['tokens']:,} tokens aligned by (seq, pos) in "
                 f"{summary['sequences']:,} sequences (`moetrace compare --out`).")
            + img(figures.compare_agreement(summary), "routing agreement of two traces by layer")
            + html_table(["layer", *[m.replace("_", " ") for m in measures]], layer_rows)
            + (note("Top-1 agreement is not measured: the rank order of "
                    f"{' and '.join(summary['rank_order_unknown'])} is unknown.")
               if summary.get("rank_order_unknown") else "")
            + f"<h3>Tokens whose {escape(summary.get('differing', 'top-1'))} differs in most layers</h3>"
            + html_table(["seq", "pos", "token id", "layers differing"], worst))


def _render_targets(ctx: Context) -> str:
    df = ctx.results
    real = df[~df["method"].str.startswith("random")]
    draws = df[df["method"].str.startswith("random:")]
    cov = (real.groupby(["method", "targeted_group", "evaluated_group"], sort=True)["coverage"].mean()
           .reset_index())
    rows = []
    tdir = ctx.run_dir / "targets" if ctx.run_dir is not None else None
    for method, target in sorted(set(zip(real["method"], real["targeted_group"]))):
        own = cov[(cov["method"] == method) & (cov["targeted_group"] == target)]
        on = own[own["evaluated_group"] == target]["coverage"]
        off = own[own["evaluated_group"] != target]["coverage"]
        n_rules = "-"
        if tdir is not None:
            path = tdir / f"{target.replace('/', '_')}_{method}.json"
            if path.is_file():
                from moetrace.targets import Targets

                n_rules = sum(Targets.load(path, kind=method).n_rules().values())
        mine = draws[(draws["method"] == f"random:{method}") & (draws["targeted_group"] == target)
                     & (draws["evaluated_group"] == target)]
        spread = (f"{mine['coverage'].mean() * 100:.1f} ({mine['coverage'].min() * 100:.1f}-"
                  f"{mine['coverage'].max() * 100:.1f})" if len(mine) else "-")
        in_band = f"{int(mine['in_band'].astype(bool).sum())}/{len(mine)}" if len(mine) and "in_band" in mine else "-"
        rows.append([method, target, n_rules, float(on.mean()) * 100 if len(on) else float("nan"),
                     float(off.mean()) * 100 if len(off) else float("nan"), spread, in_band])
    band = ""
    if ctx.has("summary.json"):
        lo, hi = json.loads((ctx.run_dir / "summary.json").read_text()).get("coverage_band", [None, None])
        if lo is not None:
            band = f" (the band: {lo:.2f}x to {hi:.2f}x the targets' coverage)"
    return (note("The routes chosen for each targeted group (seed 000's rule: a route's share of the group's "
                 "samples >= the group's share x threshold) and how much of each group's routing they cover: "
                 "own = the targeted group's routes that are targeted, others = mean over the other groups; "
                 "beside them the random draws' coverage of the targeted group's routes (mean, min-max) and how "
                 f"many draws fell inside the matching band{band}. Draws can only use routes no group's targets "
                 "use, so when the targets take most of a group's traffic no draw can match it: the comparison "
                 "with random is then one of fewer routes, which the dose-response section puts side by side "
                 "at equal coverage.")
            + img(figures.coverage(df), "coverage of each group's routes by its targets and by the random draws")
            + html_table(["method", "targeted group", "rules", "own coverage %", "others' coverage %",
                          "random draws' coverage % (min-max)", "draws in band"], rows, text_cols=2))


def _render_store(ctx: Context) -> str:
    info, counts = ctx.store.info(), ctx.counts
    facts = [
        ["path", info["path"]], ["model", info["model"] or "-"], ["tokenizer", info.get("tokenizer") or "-"],
        ["scoring", info["scoring"] or "-"],
        ["tokens (rows)", info["rows"]], ["routing rows", info["routing_rows"]], ["sequences", info["sequences"]],
        ["sequence metadata rows", info["sequence_metadata_rows"] or "none"],
        ["layers", f"{info['n_layers']} {info['layer_ids']}"], ["experts", info["n_experts"]],
        ["top-k", info["top_k"]], ["chunk rows", info["chunk_rows"]], ["format version", info["format_version"]],
    ]
    for label, values in info["labels"].items():  # values sorted, as every group list on the page
        facts.append([f"label {label}", ", ".join(f"{k}={v:,}" for k, v in sorted(values.items()))])
    for entry in info.get("interventions", []):
        ranges = ", ".join(f"{lo}" if lo == hi else f"{lo}..{hi}" for lo, hi in entry["sequences"])
        facts.append([f"captured under an intervention: sequences {ranges}",
                      "; then ".join(describe_intervention(w) for w in entry["what"])])
    arrays = []
    for name, a in info["arrays"].items():
        raw, stored = a["raw_bytes"], a["stored_bytes"]
        arrays.append([name, str(tuple(a["shape"])), a["dtype"], size(raw), size(stored),
                       raw / stored if raw and stored and raw >= 1 << 20 else "small" if raw else float("nan")])
    tokens = group_matrix(counts["tokens"], counts).reshape(-1) if "tokens" in counts.data_vars else None
    filters = counts.attrs.get("filters", "{}")
    counts_facts = [["counts", ctx.origin], ["statistics", ", ".join(sorted(counts.data_vars))],
                    ["grouped by", ", ".join(metrics.group_dims(counts)) or "nothing (one group: all)"],
                    ["filters", filters if isinstance(filters, str) else json.dumps(filters)]]
    body = (html_table(["fact", "value"], facts, text_cols=2)
            + "<h3>Arrays</h3>"
            + html_table(["array", "shape", "dtype", "raw", "stored", "ratio"], arrays, text_cols=3)
            + "<h3>Counts</h3>" + html_table(["fact", "value"], counts_facts, text_cols=2))
    if tokens is not None:
        body += html_table(["group", "tokens counted"], [[g, int(t)] for g, t in zip(ctx.groups, tokens)])
    return body


#: The report's sections, in page order: the experiment's and the counts', then each seed-003
#: analysis' own (``ANALYSIS.section`` in ``engine/analysis/<name>.py``), then the store.
SECTIONS: tuple[Section, ...] = (
    Section("experiment", "Ablation experiment", "Ablation experiment", ("results",), _render_experiment),
    Section("dose-response", "Dose-response", "Dose-response", ("dose_response.csv",), _render_dose_response),
    Section("compare", "Comparison with another trace", "Comparison", ("compare.json",), _render_compare),
    Section("targets", "Chosen targets and their coverage", "Targets", ("coverage",), _render_targets),
    Section("separation", "Domain separation by layer", "Domain separation", ("experts",), _render_separation,
            always=True),
    Section("usage", "Expert usage per layer", "Expert usage", ("experts",), _render_usage, always=True),
    Section("generated", "Prompt vs generated tokens", "Prompt vs generated", ("generated",), _render_generated),
    Section("specialists", "Specialist and generalist experts", "Specialists", ("experts",), _render_specialists,
            always=True),
    Section("paths", "Top paths per group", "Top paths", ("paths",), _render_paths, always=True),
    Section("pairs", "Top expert pairs per group", "Pairs", ("pairs",), _render_pairs, always=True),
    Section("coactivation", "Expert co-activation", "Co-activation", ("coact",), _render_coactivation, always=True),
    Section("stickiness", "Stickiness", "Stickiness", ("temporal",), _render_stickiness, always=True),
    *(a.section for a in ANALYSES if a.section is not None),
    Section("store", "Trace store", "Trace store", (), _render_store, always=True),
)

#: Count statistics the report reads: counted when a run directory has no ``counts.zarr`` or the
#: source is a bare store, and what a run directory's ``counts.zarr`` should hold.
REPORT_STATS: tuple[str, ...] = tuple(dict.fromkeys(n for s in SECTIONS for n in s.needs if n in STATS
                                                   and n != "tokens"))


def planned_sections(ctx: Context) -> list[Section]:
    """The sections a page shows for this data, in order."""
    return [s for s in SECTIONS if s.always or all(ctx.has(n) for n in s.needs)]


def _render(section: Section, ctx: Context) -> str:
    missing = [n for n in section.needs if n in STATS and not ctx.has(n)]
    body = note(_not_counted(missing, ctx.store.rank_order)) if missing else section.render(ctx)
    return section_html(section.id, section.title, body)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def write_report(source: str | Path, out_html: str | Path, *, results: str | Path | pd.DataFrame | None = None,
                 title: str | None = None) -> Path:
    """Write the HTML report of a trace store or an experiment run directory; returns ``out_html``.

    source: a trace store (``TraceStore.open`` opens it), or a run directory holding
        ``trace.zarr``, optionally ``counts.zarr`` (:func:`moetrace.counting.save_counts`; else the
        store is counted for :data:`REPORT_STATS` by all its labels), ``results.csv``, ``targets/``
        and ``analysis/`` (what the analysis commands wrote with ``--out RUN/analysis``).
    results: an experiment's results table (CSV path or DataFrame, see :func:`load_results`);
        overrides the run directory's ``results.csv``.
    title: the page title (default: "moetrace report: <source name>").
    The page has the sections of :data:`SECTIONS` whose data is present. Parent directories of
    ``out_html`` are created. Raises MoetraceError on a source that is neither a store nor a run
    directory, or on a malformed results table.
    """
    source = Path(source)
    out_html = Path(out_html)
    table = load_results(results) if results is not None else None
    store, counts, origin, results_csv = _load(source)
    # one group order on the whole page: label values sorted (the store keeps them in order of appearance)
    counts = counts.sortby(list(metrics.group_dims(counts))) if metrics.group_dims(counts) else counts
    if table is None and results_csv is not None:
        table = load_results(results_csv)
    info = store.info()
    groups = figures.group_labels(counts)
    title = title if title is not None else f"moetrace report: {source.resolve().name}"
    run_dir = source if (source / "trace.zarr").is_dir() else None
    ctx = Context(store=store, counts=counts, origin=origin, groups=groups, results=table, run_dir=run_dir)
    sections = planned_sections(ctx)
    nav = "".join(f'<a href="#{escape(s.id)}">{escape(s.nav)}</a>' for s in sections)
    summary = (f"{info['rows']:,} tokens, {info['sequences']:,} sequences, {info['n_layers']} layers, "
               f"top-{info['top_k']} of {info['n_experts']} experts, groups: {', '.join(groups)}")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        f"<title>{escape(title)}</title>\n<style>{_STYLE}</style></head>\n<body>\n"
        f"<h1>{escape(title)}</h1>\n<p>{escape(summary)}</p>\n<nav>{nav}</nav>\n"
        + "\n".join(_render(s, ctx) for s in sections)
        + "\n</body></html>\n"
    )
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(page, encoding="utf-8")
    return out_html
