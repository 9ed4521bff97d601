"""Analyses of routing counts: the seed 000 and seed 002 notebooks, and the OLMoE-paper metrics.

Every function here is a pure function of a Counts dataset (an ``xarray.Dataset`` written by
:mod:`moetrace.counting`), computed with NumPy / SciPy / xarray; nothing loops over trace rows.

Counts format (``attrs["moetrace_counts_version"] == 1``): one dimension per ``by`` label
(named as the label, label strings as coordinates), ``layer`` (model layer ids), ``rank``
(0 = top choice) and expert dimensions ``expert``, ``prev_expert``, ``first``, ``second``,
``next_expert``, ``other_expert`` (expert ids). int64 variables ``experts`` (group..., layer,
rank, expert), ``paths`` (group..., layer, prev_expert, expert), ``pairs`` (group..., layer,
first, second), ``temporal`` (group..., layer, expert, next_expert), ``coact`` (layer, expert,
other_expert), float64 ``weight_sum`` (group..., layer, expert), ``tokens`` (group...) and the
optional ``vocab`` (token_id, layer, expert), counted over all top-k ranks.

A *group* is one combination of the ``by`` labels (e.g. ``domain=biology, lang=en``). Seed 002
has a single label (its domain); where its code builds a "domain x expert" matrix, this module
builds a "group x expert" matrix whose rows are all label combinations, flattened in the order
of the dimensions.

Where a seed's code and its prose disagree, this module follows the code and says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product

import numpy as np
import scipy.stats
import xarray as xr

from moetrace.counting.files import COUNTS_VERSION
from moetrace.errors import MoetraceError
from moetrace.kernels import counting as _counting
from moetrace.store import require_rank_order

# Dimensions of a Counts dataset that are not group (``by`` label) dimensions: every
# statistic's own dims, from the registry in kernels/counting.py.
NON_GROUP_DIMS = frozenset({d for cls in _counting.STATS.values() for d in cls.dims} | {"token"})

# method -> (variable, item dims, default min_layer_index, default threshold); seed 000's rules.
SPECIALIZATION_METHODS = {
    "paths": ("paths", ("prev_expert", "expert"), 1, 1.0),
    "experts": ("experts", ("expert",), 1, 5.0),
    "pairs": ("pairs", ("first", "second"), 0, 5.0),
}

# Seed 002 adds 1e-10 to the mean before dividing (coefficient of variation).
CV_EPSILON = 1e-10


# ----------------------------------------------------------------------------------------------
# Counts helpers
# ----------------------------------------------------------------------------------------------


def check_counts(counts: xr.Dataset, need: Sequence[str] = ()) -> None:
    """Check that ``counts`` is a Counts dataset of this version holding the variables ``need``.

    Raises MoetraceError naming the attribute or variable that is wrong.
    """
    if not isinstance(counts, xr.Dataset):
        raise MoetraceError(f"counts: expected an xarray.Dataset, got {type(counts).__name__}")
    version = counts.attrs.get("moetrace_counts_version")
    if version is None:
        raise MoetraceError("counts: attribute 'moetrace_counts_version' is missing; not a moetrace Counts dataset")
    if int(version) != COUNTS_VERSION:
        raise MoetraceError(
            f"counts: expected moetrace_counts_version {COUNTS_VERSION}, got {version}; recount with this moetrace"
        )
    for name in need:
        if name not in counts.data_vars:
            raise MoetraceError(
                f"counts: variable {name!r} is missing (has {sorted(counts.data_vars)}); count it with --stats {name}"
            )


def group_dims(counts: xr.Dataset) -> list[str]:
    """Names of the group (``by`` label) dimensions of ``counts``, in dataset order.

    Taken from the dims of ``tokens`` when present, else from the first grouped count variable.
    """
    if "tokens" in counts.data_vars:
        return list(counts["tokens"].dims)
    for name in _counting.grouped_stats():
        if name in counts.data_vars:
            return [d for d in counts[name].dims if d not in NON_GROUP_DIMS]
    return []


def group_names(counts: xr.Dataset) -> list[tuple[str, ...]]:
    """The flattened groups: one tuple of label values per group, C order over ``group_dims``.

    With no ``by`` labels there is one group, the empty tuple.
    """
    dims = group_dims(counts)
    return list(product(*[[str(v) for v in counts[d].values] for d in dims]))


def flatten_groups(da: xr.DataArray, gdims: Sequence[str]) -> np.ndarray:
    """Values of ``da`` with its group dims ``gdims`` first and flattened: shape (G, *rest).

    Rows follow :func:`group_names` (C order over ``gdims``); the other dims keep their order.
    """
    rest = [d for d in da.dims if d not in gdims]
    arr = da.transpose(*gdims, *rest).values
    n_groups = int(np.prod([da.sizes[d] for d in gdims], dtype=np.int64))
    return arr.reshape((n_groups, *arr.shape[len(gdims):]))


def _expert_counts(counts: xr.Dataset, rank: int | None) -> xr.DataArray:
    """``experts`` summed over ranks (rank=None) or at one rank: (group..., layer, expert) int64."""
    check_counts(counts, ["experts"])
    experts = counts["experts"]
    if rank is None:
        return experts.sum("rank")
    require_rank_order(counts.attrs.get("rank_order", "ranked"), str(counts.attrs.get("store", "counts")),
                       f"--rank {rank}")
    if rank not in experts["rank"].values:
        raise MoetraceError(f"rank: expected one of {experts['rank'].values.tolist()}, got {rank}")
    return experts.sel(rank=rank, drop=True)


def _layer_position(counts: xr.Dataset, layer: int) -> int:
    layers = counts["layer"].values.tolist()
    if layer not in layers:
        raise MoetraceError(f"layer: expected one of the counted layer ids {layers}, got {layer}")
    return layers.index(layer)


def _prune(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop all-zero rows and columns, as ``pandas.pivot_table(aggfunc='size')`` never creates them.

    Returns (pruned matrix, kept row indices, kept column indices).
    """
    rows = np.flatnonzero(matrix.sum(axis=1))
    cols = np.flatnonzero(matrix.sum(axis=0))
    return matrix[np.ix_(rows, cols)], rows, cols


# ----------------------------------------------------------------------------------------------
# Seed 000
# ----------------------------------------------------------------------------------------------


def squish(values: np.ndarray) -> np.ndarray:
    """R's ``stringr::str_squish``: trim and collapse every internal whitespace run to one space.

    values: str array [n]. Returns str array [n]. Works on the distinct values only.
    """
    values = np.asarray(values, dtype=str)
    uniques, inverse = np.unique(values, return_inverse=True)
    squished = np.array([" ".join(u.split()) for u in uniques.tolist()], dtype=str)
    return squished[inverse.reshape(values.shape)] if values.size else values


def base_accuracy(
    sequences: Mapping[str, np.ndarray],
    by: Sequence[str],
    output_col: str = "question_output_token",
    answer_col: str = "answer_char",
    tokens: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Seed 000's base accuracy per group: squished output token == answer character.

    sequences: one row per question (e.g. ``TraceStore.read_sequences()``): str arrays [S]
        ``output_col`` (the model's answer token) and ``answer_col`` (the right answer), and one
        str array [S] per label in ``by``.
    tokens: int array [S], tokens counted per question (seed 000: rows left after dropping the
        shared prefix); defaults to ``sequences["n_tokens"]`` when that column exists. Questions
        with 0 tokens are left out, as R computes the table from the filtered token rows.

    Returns a table (dict of equal-length arrays, one row per group present, sorted by the
    ``by`` labels like R's ``group_by``): the label columns (str), ``base_acc`` (float64:
    correct / questions), ``questions`` (int64) and, when token counts are known,
    ``total_tokens`` (int64). As in the R code, the output token is squished
    (``str_squish``) and the answer is compared as is.
    """
    by = list(by)
    for col in [output_col, answer_col, *by]:
        if col not in sequences:
            raise MoetraceError(f"sequences: column {col!r} is missing (has {sorted(sequences)})")
    output = np.asarray(sequences[output_col], dtype=str)
    answer = np.asarray(sequences[answer_col], dtype=str)
    if tokens is None and "n_tokens" in sequences:
        tokens = sequences["n_tokens"]
    if tokens is not None:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.shape != output.shape:
            raise MoetraceError(f"tokens: expected shape {output.shape}, got {tokens.shape}")
    keys = [np.asarray(sequences[col], dtype=str) for col in by]
    if tokens is not None:
        kept = tokens > 0
        output, answer, tokens = output[kept], answer[kept], tokens[kept]
        keys = [key[kept] for key in keys]
    correct = (squish(output) == answer).astype(np.int64)

    if keys:
        uniq, group = np.unique(np.stack(keys, axis=1), axis=0, return_inverse=True)
        group = group.reshape(-1)
    else:
        uniq, group = np.empty((1, 0), dtype=str), np.zeros(output.shape[0], dtype=np.int64)
    n_groups = uniq.shape[0]
    questions = np.bincount(group, minlength=n_groups).astype(np.int64)
    table: dict[str, np.ndarray] = {col: uniq[:, i] for i, col in enumerate(by)}
    table["base_acc"] = np.bincount(group, weights=correct, minlength=n_groups) / questions
    table["questions"] = questions
    if tokens is not None:
        table["total_tokens"] = np.bincount(group, weights=tokens, minlength=n_groups).astype(np.int64)
    return table


@dataclass(frozen=True, eq=False)
class Selection:
    """Items that seed 000's rule selects for one group (the R notebook's ``spec_*`` tables).

    n items, in (layer, item) order:
      layer: int64[n] layer ids (for paths, the layer transitioned into).
      items: int64[n, w] expert ids: paths (prev_expert, expert); experts (expert,); pairs
        (first, second).
      n_samples: int64[n] the item's count in the group; n_total: int64[n] its count over all
        groups; prop: float64[n] = n_samples / n_total (R's ``prop_of_samples``).
    group_share: the group's share of all samples (R's ``n_tok_prop``); group_samples and
    all_samples: the group's and all groups' sample totals. max_threshold: the largest
    threshold at which the rule still selects at least one item (0.0 when the group has no
    samples): since ``prop <= 1``, a threshold above ``1 / group_share`` never selects anything
    (with G equal groups, seed 000's default 5 needs G >= 5).
    """

    method: str
    group: dict[str, str]
    threshold: float
    min_layer_index: int
    group_share: float
    group_samples: int
    all_samples: int
    layer: np.ndarray
    items: np.ndarray
    n_samples: np.ndarray
    n_total: np.ndarray
    prop: np.ndarray = field(repr=False)
    max_threshold: float = 0.0

    def __len__(self) -> int:
        return int(self.layer.shape[0])


def _group_selector(counts: xr.Dataset, group: Mapping[str, str]) -> dict[str, str]:
    gdims = group_dims(counts)
    if not group:
        raise MoetraceError(f"group: expected at least one label=value (labels: {gdims}), got none")
    for label, value in group.items():
        if label not in gdims:
            raise MoetraceError(f"group: unknown label {label!r}; the counts are grouped by {gdims}")
        values = [str(v) for v in counts[label].values]
        if str(value) not in values:
            raise MoetraceError(f"group: unknown value {value!r} for label {label!r}; expected one of {values}")
    return {label: str(value) for label, value in group.items()}


def specialized(
    counts: xr.Dataset,
    method: str = "paths",
    group: Mapping[str, str] | None = None,
    threshold: float | None = None,
    min_layer_index: int | None = None,
) -> Selection:
    """Seed 000's specialization rule: the paths / experts / pairs specialized in one group.

    For each item x (a path prev -> expert into a layer, a top-1 expert at a layer, or an
    ordered rank-0/rank-1 pair at a layer), with n_g(x) its count in the group and n(x) its
    count over all groups, x is kept when

        n_g(x) > 0  and  n_g(x) / n(x) >= (N_g / N) * threshold,

    N_g / N being the group's share of all samples of the same kind over the same layers
    (R: ``prop_of_samples >= n_tok_prop * threshold``). Samples per method, as in the R code:
      - "paths": ``paths`` of layers at index >= 1 (R: ``filter(layer_ix > 0)``); threshold 1.
      - "experts": rank-0 ``experts`` of layers at index >= 1; threshold 5.
      - "pairs": ``pairs`` of all layers (R never filters them); threshold 5.
    ``min_layer_index`` counts positions along ``layer``. R filters on the layer *id*
    (``layer_ix > 0``), which skips the first recorded layer because the notebook's layer ids
    start at 0; for a model whose first MoE layer id is above 0 (e.g. DeepSeek's leading dense
    layers) the R code would keep every layer and one-element "paths" at the first one; this
    function always skips by position (the first recorded layer has no incoming path).
    The notebook's heading calls method 3 "multiple experts"; its code keeps the order of the
    two top experts (``arrange(topk_ix)``, "order matters!"), and so does this function.

    group: label -> value, e.g. ``{"domain": "biology", "lang": "en"}``; may name a subset of the
    ``by`` labels, the others are summed over. Unknown labels or values raise MoetraceError.
    The arithmetic (int counts, two float64 divisions, one product, ``>=``) is the R code's, so
    ties at the threshold resolve identically.
    """
    if method not in SPECIALIZATION_METHODS:
        raise MoetraceError(f"method: expected one of {sorted(SPECIALIZATION_METHODS)}, got {method!r}")
    var, item_dims, default_min_layer, default_threshold = SPECIALIZATION_METHODS[method]
    check_counts(counts, [var])
    require_rank_order(counts.attrs.get("rank_order", "ranked"), str(counts.attrs.get("store", "counts")),
                       f"specialization by {method} (top-1 experts, paths and ordered pairs)")
    selector = _group_selector(counts, group or {})
    threshold = default_threshold if threshold is None else float(threshold)
    if not np.isfinite(threshold) or threshold < 0:
        raise MoetraceError(f"threshold: expected a finite number >= 0, got {threshold}")
    min_layer_index = default_min_layer if min_layer_index is None else int(min_layer_index)
    if not 0 <= min_layer_index < counts.sizes["layer"]:
        raise MoetraceError(
            f"min_layer_index: expected 0..{counts.sizes['layer'] - 1}, got {min_layer_index}"
        )

    da = counts[var]
    if method == "experts":
        da = da.sel(rank=0, drop=True)
    da = da.isel(layer=slice(min_layer_index, None)).transpose(..., "layer", *item_dims)
    gdims = group_dims(counts)
    in_group = da.sel(selector).sum([d for d in gdims if d not in selector])
    total = da.sum(gdims)
    group_samples = int(in_group.sum())
    all_samples = int(total.sum())
    if all_samples == 0:
        raise MoetraceError(
            f"counts: no {var} samples in layers from index {min_layer_index}; nothing to select from"
        )
    group_share = group_samples / all_samples

    n_g = in_group.values.astype(np.int64)
    n_all = total.values.astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        prop = n_g / n_all
    keep = (n_g > 0) & (prop >= group_share * threshold)
    index = np.nonzero(keep)
    max_threshold = _largest_threshold(prop[n_g > 0], group_share)
    layer_ids = da["layer"].values.astype(np.int64)[index[0]]
    items = np.stack(
        [da[d].values.astype(np.int64)[i] for d, i in zip(item_dims, index[1:])], axis=1
    ).reshape(-1, len(item_dims))
    return Selection(
        method=method,
        group=selector,
        threshold=threshold,
        min_layer_index=min_layer_index,
        group_share=group_share,
        group_samples=group_samples,
        all_samples=all_samples,
        layer=layer_ids,
        items=items,
        n_samples=n_g[index],
        n_total=n_all[index],
        prop=prop[index],
        max_threshold=max_threshold,
    )


def _largest_threshold(prop: np.ndarray, group_share: float) -> float:
    """The largest t with ``max(prop) >= group_share * t`` in float64 (the rule's own arithmetic)."""
    if prop.size == 0 or group_share <= 0:
        return 0.0
    best = float(prop.max())
    t = best / group_share  # exact up to rounding: walk the few ulps to the largest t that passes
    while t > 0 and not best >= group_share * t:
        t = float(np.nextafter(t, 0.0))
    while best >= group_share * float(np.nextafter(t, np.inf)):
        t = float(np.nextafter(t, np.inf))
    return t


# ----------------------------------------------------------------------------------------------
# Seed 002
# ----------------------------------------------------------------------------------------------


def frequency_matrix(counts: xr.DataArray | xr.Dataset, layer: int, rank: int | None = None) -> xr.DataArray:
    """Seed 002's group x expert frequency matrix at one layer.

    layer: a layer id (a coordinate value of ``layer``). rank: None sums all top-k ranks, as
    seed 002 does (it records positions 0..3 of each token); an int keeps one rank.
    Returns int64 DataArray (group..., expert): how often each expert was chosen. Unlike the
    notebook's ``pivot_table`` it keeps all-zero rows and columns (see :func:`chi_square`).
    """
    experts = _expert_counts(counts, rank)
    _layer_position(counts, layer)
    return experts.sel(layer=layer, drop=True)


def percentages(freq: xr.DataArray, dim: str = "expert") -> xr.DataArray:
    """Row-normalized percentages of a frequency matrix: ``freq / freq.sum(dim) * 100``.

    Seed 002's ``freq_matrix.div(freq_matrix.sum(axis=1), axis=0) * 100`` (each group's usage
    of each expert, in percent of the group's activations). float64, NaN for an empty row.
    """
    total = freq.sum(dim)
    return (freq / total.where(total > 0)) * 100.0


def _chi2_pruned(observed: np.ndarray) -> tuple[float, int, float]:
    """Chi-square test of independence on a matrix without all-zero rows/columns.

    Same as ``scipy.stats.chi2_contingency(observed)`` (default ``correction=True``): Yates'
    continuity correction when dof == 1 (each cell moved by min(0.5, |E - O|) towards E),
    statistic 0 and p-value 1 when dof == 0. Returns (statistic, dof, p-value).
    """
    n_rows, n_cols = observed.shape
    dof = (n_rows - 1) * (n_cols - 1)
    if dof == 0:
        return 0.0, 0, 1.0
    obs = observed.astype(np.float64)
    expected = np.outer(obs.sum(axis=1), obs.sum(axis=0)) / obs.sum()
    if dof == 1:
        diff = expected - obs
        obs = obs + np.sign(diff) * np.minimum(0.5, np.abs(diff))
    statistic = float(((obs - expected) ** 2 / expected).sum())
    return statistic, dof, float(scipy.stats.chi2.sf(statistic, dof))


def _layer_tables(counts: xr.Dataset, rank: int | None):
    """Yield (layer id, group x expert int64 matrix [G, E]) per layer."""
    experts = _expert_counts(counts, rank)
    flat = flatten_groups(experts.transpose(..., "layer", "expert"), group_dims(counts))  # [G, L, E]
    for i, layer in enumerate(counts["layer"].values.tolist()):
        yield layer, flat[:, i, :]


def chi_square(counts: xr.Dataset, rank: int | None = None) -> xr.Dataset:
    """Seed 002's chi-square test of independence of group and expert, per layer.

    On each layer's group x expert frequency matrix (ranks summed unless ``rank`` is given),
    with all-zero rows (groups absent at that layer) and columns (experts never chosen) dropped,
    as the notebook's ``pivot_table(aggfunc='size', fill_value=0)`` never creates them. Equal to
    ``scipy.stats.chi2_contingency`` on that matrix (Yates' correction at dof == 1, statistic 0
    and p 1 at dof == 0). A layer with no counts gets NaN (the notebook skips it).

    Returns a Dataset over ``layer``: ``chi2`` float64, ``dof`` int64, ``p_value`` float64,
    ``n_groups`` and ``n_experts`` int64 (the rows and columns tested).
    """
    layers, chi2, dof, p_value, n_groups, n_experts = [], [], [], [], [], []
    for layer, matrix in _layer_tables(counts, rank):
        pruned, rows, cols = _prune(matrix)
        if pruned.size:
            stat, d, p = _chi2_pruned(pruned)
        else:
            stat, d, p = np.nan, 0, np.nan
        layers.append(layer)
        chi2.append(stat)
        dof.append(d)
        p_value.append(p)
        n_groups.append(rows.size)
        n_experts.append(cols.size)
    return xr.Dataset(
        {
            "chi2": ("layer", np.asarray(chi2, dtype=np.float64)),
            "dof": ("layer", np.asarray(dof, dtype=np.int64)),
            "p_value": ("layer", np.asarray(p_value, dtype=np.float64)),
            "n_groups": ("layer", np.asarray(n_groups, dtype=np.int64)),
            "n_experts": ("layer", np.asarray(n_experts, dtype=np.int64)),
        },
        coords={"layer": np.asarray(layers, dtype=np.int64)},
    )


def layer_ranking(counts: xr.Dataset, rank: int | None = None, alpha: float = 0.001) -> xr.Dataset:
    """Seed 002's domain separation by layer.

    Per layer, on the pruned group x expert matrix of :func:`chi_square`: ``chi2``, ``p_value``,
    ``dof``; ``avg_variance`` = mean over the experts of the across-group sample variance
    (ddof=1, as pandas ``DataFrame.var``) of the row-normalized usage (each group's row divided
    by its total, fractions not percent); ``significant`` = p_value < alpha (seed: 0.001).
    NaN where a layer has no counts, and ``avg_variance`` NaN with fewer than two groups.
    Layers keep their order; ``ds.sortby("chi2", ascending=False)`` ranks them as the seed's
    ``nlargest(5, 'chi2')``.
    """
    ds = chi_square(counts, rank)
    avg_variance = []
    for _, matrix in _layer_tables(counts, rank):
        pruned, rows, _ = _prune(matrix)
        if rows.size < 2:
            avg_variance.append(np.nan)
            continue
        norm = pruned / pruned.sum(axis=1, keepdims=True)
        avg_variance.append(float(norm.var(axis=0, ddof=1).mean()))
    ds["avg_variance"] = ("layer", np.asarray(avg_variance, dtype=np.float64))
    ds["significant"] = ds["p_value"] < alpha
    ds.attrs["alpha"] = alpha
    return ds


def expert_variation(counts: xr.Dataset, layer: int, rank: int | None = None) -> xr.Dataset:
    """Seed 002's specialist and generalist experts at one layer (coefficient of variation).

    On the layer's pruned group x expert count matrix F (see :func:`chi_square`):
    cv[e] = std_g(F[:, e]) / (mean_g(F[:, e]) + 1e-10), std with ddof=1 (pandas' default);
    specialists: cv > 75th percentile of cv over the experts; generalists: cv < 25th percentile
    (linear interpolation, as pandas ``quantile``). Each expert's preferred group is the argmax
    of its column (ties: first group in sorted label order, as ``pivot_table`` sorts its index
    and ``idxmax`` takes the first); ``usage_pct`` is that group's row-normalized percentage
    for the expert. The notebook's printout calls this "% of its usage" (the expert's usage),
    but its code reads ``freq_matrix_pct.loc[domain, expert]``, the share of the *group's*
    activations that go to the expert; this follows the code.

    Returns a Dataset over ``expert`` (all expert ids): ``cv`` float64 (NaN for experts never
    chosen at this layer, which the notebook's matrix does not have), ``specialist`` and
    ``generalist`` bool, ``usage_pct`` float64, and one str variable ``preferred_<label>`` per
    group label ("" for unused experts). attrs: ``layer``, ``q25``, ``q75``.
    """
    pos = _layer_position(counts, layer)
    gdims = group_dims(counts)
    experts = _expert_counts(counts, rank)
    matrix = flatten_groups(experts.transpose(..., "layer", "expert"), gdims)[:, pos, :]
    names = group_names(counts)
    pruned, rows, cols = _prune(matrix)
    n_experts = matrix.shape[1]

    cv = np.full(n_experts, np.nan)
    specialist = np.zeros(n_experts, dtype=bool)
    generalist = np.zeros(n_experts, dtype=bool)
    usage_pct = np.full(n_experts, np.nan)
    preferred = np.full(n_experts, -1, dtype=np.int64)
    q25 = q75 = np.nan
    if pruned.size:
        if rows.size >= 2:
            cv_used = pruned.std(axis=0, ddof=1) / (pruned.mean(axis=0) + CV_EPSILON)
            q25, q75 = np.quantile(cv_used, [0.25, 0.75])
            cv[cols] = cv_used
            specialist[cols] = cv_used > q75
            generalist[cols] = cv_used < q25
        # argmax in sorted group order, mapped back to flat group indices
        order = sorted(range(rows.size), key=lambda i: names[rows[i]])
        best = np.asarray(order)[np.argmax(pruned[order, :], axis=0)]
        pct = pruned / pruned.sum(axis=1, keepdims=True) * 100.0
        usage_pct[cols] = pct[best, np.arange(cols.size)]
        preferred[cols] = rows[best]

    data = {
        "cv": ("expert", cv),
        "specialist": ("expert", specialist),
        "generalist": ("expert", generalist),
        "usage_pct": ("expert", usage_pct),
    }
    for j, label in enumerate(gdims):
        values = np.array([names[g][j] if g >= 0 else "" for g in preferred.tolist()], dtype=str)
        data[f"preferred_{label}"] = ("expert", values)
    return xr.Dataset(
        data,
        coords={"expert": counts["expert"].values},
        attrs={"layer": int(layer), "q25": float(q25), "q75": float(q75)},
    )


def entropy(counts: xr.Dataset, rank: int | None = None) -> xr.Dataset:
    """Seed 002's Shannon entropy of expert usage, in bits, per group and layer.

    H = -sum_e p_e log2 p_e with p_e = count(e) / sum(count) over the group's expert
    selections at the layer (all ranks summed unless ``rank`` is given; seed 002 takes
    ``value_counts(normalize=True)`` over all four positions). Returns a Dataset with
    ``entropy`` float64 (group..., layer) (NaN where the group has no counts at the layer) and
    ``max_entropy`` = log2(E) (the uniform distribution over the E experts).
    """
    usage = _expert_counts(counts, rank)
    total = usage.sum("expert")
    p = usage / total.where(total > 0)
    plogp = xr.where(p > 0, p * np.log2(p.where(p > 0)), 0.0)
    h = -plogp.sum("expert")
    h = h.where(total > 0)
    n_experts = counts.sizes["expert"]
    return xr.Dataset({"entropy": h, "max_entropy": float(np.log2(n_experts))})


def stickiness(counts: xr.Dataset) -> xr.Dataset:
    """Seed 002's lag-1 temporal stickiness of the top-1 expert, per group and layer.

    stickiness = trace(T) / sum(T) where T[e, e'] counts top-1 expert e at token t followed by
    e' at token t+1 of the same sequence (``temporal``): the probability that consecutive
    tokens keep their top-1 expert. The seed computes it on one domain's single token stream
    (tokens 0..99 in order); here transitions never cross a sequence boundary. Baseline: 1/E
    (the notebook's "random baseline" 1/32).

    Returns a Dataset: ``stickiness`` float64 (group..., layer) (NaN without transitions),
    ``same`` and ``transitions`` int64 (group..., layer), ``baseline`` = 1/E.
    """
    check_counts(counts, ["temporal"])
    temporal = counts["temporal"].transpose(..., "expert", "next_expert")
    same_values = np.einsum("...ii->...", temporal.values)
    same = xr.DataArray(same_values.astype(np.int64), dims=temporal.dims[:-2],
                        coords={d: temporal[d] for d in temporal.dims[:-2]})
    transitions = temporal.sum(["expert", "next_expert"])
    return xr.Dataset(
        {
            "stickiness": same / transitions.where(transitions > 0),
            "same": same,
            "transitions": transitions,
            "baseline": 1.0 / counts.sizes["expert"],
        }
    )


# ----------------------------------------------------------------------------------------------
# OLMoE paper (Muennighoff et al. 2024, section 5) and seed 003's router metrics
# ----------------------------------------------------------------------------------------------


def _top_k(counts: xr.Dataset) -> int:
    if "top_k" in counts.attrs:
        return int(counts.attrs["top_k"])
    return int(counts.sizes["rank"])


def selection_frequency(counts: xr.Dataset) -> xr.Dataset:
    """Expert selection frequency per group and layer, against the uniform baseline k/E.

    frequency[g, l, e] = N_k(E_e, g, l) / N(g): the fraction of the group's tokens that have
    expert e among their top-k at layer l (``experts`` summed over ranks divided by ``tokens``);
    it sums to k over the experts. Returns a Dataset: ``frequency`` float64 (group..., layer,
    expert) (NaN for a group without tokens), ``ratio`` = frequency / baseline, ``baseline`` = k/E.
    """
    check_counts(counts, ["experts", "tokens"])
    selected = counts["experts"].sum("rank")
    tokens = counts["tokens"]
    frequency = selected / tokens.where(tokens > 0)
    baseline = _top_k(counts) / counts.sizes["expert"]
    return xr.Dataset({"frequency": frequency, "ratio": frequency / baseline, "baseline": baseline})


def domain_specialization(counts: xr.Dataset, normalize: str = "group") -> xr.Dataset:
    """OLMoE domain specialization of each expert per group (domain) and layer.

    N_k(E_i, D) = tokens of group D that have expert E_i among their top-k (``experts`` summed
    over ranks).
      - normalize="group" (default; the OLMoE paper's plots, the project's definition):
        N_k(E_i, D) / N_D with N_D the group's token count: the fraction of the domain's tokens
        routed to E_i; sums to k over experts; uniform baseline k/E. (The same numbers as
        :func:`selection_frequency`, read per domain.)
      - normalize="expert": N_k(E_i, D) / sum_D N_k(E_i, D): the fraction of E_i's top-k
        selections that come from D; sums to 1 over groups.
    Returns a Dataset: ``specialization`` float64 (group..., layer, expert) (NaN on empty
    denominators) and ``baseline`` (k/E for "group", 1/G for "expert").
    """
    check_counts(counts, ["experts", "tokens"])
    selected = counts["experts"].sum("rank")
    if normalize == "group":
        tokens = counts["tokens"]
        spec = selected / tokens.where(tokens > 0)
        baseline = _top_k(counts) / counts.sizes["expert"]
    elif normalize == "expert":
        gdims = group_dims(counts)
        total = selected.sum(gdims)
        spec = selected / total.where(total > 0)
        baseline = 1.0 / max(1, len(group_names(counts)))
    else:
        raise MoetraceError(f"normalize: expected 'group' or 'expert', got {normalize!r}")
    return xr.Dataset({"specialization": spec, "baseline": baseline})


def vocabulary_specialization(counts: xr.Dataset, normalize: str = "token") -> xr.Dataset:
    """OLMoE vocabulary (token id) specialization of each expert, from ``vocab`` (token_id, layer, expert).

    ``vocab`` counts top-k selections: N_k(x, E_i) = occurrences of token id x that have E_i
    among their top-k at the layer.
      - normalize="token" (default): N_k(x, E_i) / N(x), N(x) = sum_i N_k(x, E_i) / k the token's
        occurrences: the fraction of x's occurrences routed to E_i; uniform baseline k/E.
      - normalize="expert": N_k(x, E_i) / sum_x N_k(x, E_i): the share of E_i's selections that
        are token x; sums to 1 over tokens.
    Returns a Dataset: ``specialization`` float64 (token_id, layer, expert) (NaN on empty
    denominators, e.g. token ids that never occur) and ``baseline`` (k/E for "token", NaN for
    "expert").
    """
    check_counts(counts, ["vocab"])
    vocab = counts["vocab"]
    token_dim = next(d for d in vocab.dims if d not in ("layer", "expert"))
    k = _top_k(counts)
    if normalize == "token":
        occurrences = vocab.sum("expert") / k
        spec = vocab / occurrences.where(occurrences > 0)
        baseline = k / counts.sizes["expert"]
    elif normalize == "expert":
        total = vocab.sum(token_dim)
        spec = vocab / total.where(total > 0)
        baseline = np.nan
    else:
        raise MoetraceError(f"normalize: expected 'token' or 'expert', got {normalize!r}")
    return xr.Dataset({"specialization": spec, "baseline": baseline})


def coactivation(counts: xr.Dataset) -> xr.DataArray:
    """OLMoE co-activation N(E_i, E_j) / N(E_i) per layer, from ``coact``.

    ``coact[l, i, j]`` counts tokens with both E_i and E_j in their top-k; its diagonal is
    N(E_i), the tokens selecting E_i. Returns float64 (layer, expert, other_expert): the
    fraction of E_i's tokens that also select E_j (row i; not symmetric). The diagonal is 1;
    rows of never-chosen experts are NaN.
    """
    check_counts(counts, ["coact"])
    coact = counts["coact"].transpose("layer", "expert", "other_expert")
    diag = np.einsum("lii->li", coact.values)
    n_i = xr.DataArray(diag, dims=("layer", "expert"), coords={"layer": coact["layer"], "expert": coact["expert"]})
    return coact / n_i.where(n_i > 0)
