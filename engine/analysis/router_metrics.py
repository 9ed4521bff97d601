"""Router metrics (seed 003's ``router_metrics.py``): expert selection frequency, domain
specialization and expert token overlap per layer, for any number of groups and experts.

Selection frequency and domain specialization come from the functions moetrace already has
(:func:`moetrace.metrics.selection_frequency`, and :func:`moetrace.metrics.domain_specialization` with
``normalize="expert"``: the share of the expert's selections from the group, not the OLMoE paper's
per-group normalization); this module only adds the token overlap and puts the three in one table.

Normalizations:
- ``frequency`` [group, layer, expert] = N_k(E_e, g) / N_g: the fraction of the group's tokens with
  e among their top-k (sums to k over experts; uniform k/E).
- ``specialization`` [group, layer, expert] = N_k(E_e, g) / sum_g' N_k(E_e, g'): the share of
  expert e's selections that come from group g (sums to 1 over groups; uniform 1/G).
- ``overlap`` [layer, expert, other_expert] = |T_i & T_j| / |T_i | T_j| (Jaccard) with T_i the tokens
  that select expert i among their top-k, from the ``coact`` counts; the diagonal is 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from moetrace import metrics


def token_overlap(counts: xr.Dataset) -> xr.DataArray:
    """Jaccard overlap of the token sets of every pair of experts per layer, from ``coact``."""
    metrics.check_counts(counts, ["coact"])
    c = counts["coact"].transpose("layer", "expert", "other_expert")
    both = c.values.astype(np.float64)
    n = np.einsum("lii->li", both)
    union = n[:, :, None] + n[:, None, :] - both
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(union > 0, both / np.where(union > 0, union, 1), np.nan)
    return xr.DataArray(values, dims=c.dims, coords=c.coords, name="overlap")


def router_metrics(counts: xr.Dataset) -> xr.Dataset:
    """``frequency``, ``specialization`` (group, layer, expert; groups flattened to ``a/b`` names)
    and ``overlap`` (layer, expert, other_expert) from counts with ``experts``, ``tokens``, ``coact``."""
    freq = metrics.selection_frequency(counts)
    spec = metrics.domain_specialization(counts, normalize="expert")
    gdims = metrics.group_dims(counts)
    names = ["/".join(g) or "all" for g in metrics.group_names(counts)]

    def flat(da: xr.DataArray) -> np.ndarray:
        return metrics.flatten_groups(da.transpose(..., "layer", "expert"), gdims)

    out = xr.Dataset(
        {"frequency": (("group", "layer", "expert"), flat(freq["frequency"])),
         "specialization": (("group", "layer", "expert"), flat(spec["specialization"]))},
        coords={"group": names, "layer": counts["layer"].values, "expert": counts["expert"].values},
        attrs={"frequency_baseline": float(freq["baseline"]), "specialization_baseline": float(spec["baseline"]),
               "analysis": "router_metrics"})
    if "coact" in counts.data_vars:
        overlap = token_overlap(counts)
        out["overlap"] = (("layer", "expert", "other_expert"), overlap.values)
        out = out.assign_coords(other_expert=counts["other_expert"].values)
    return out


def table(ds: xr.Dataset) -> pd.DataFrame:
    """Tidy rows (group, layer, expert, frequency, specialization)."""
    return ds[["frequency", "specialization"]].to_dataframe().reset_index()
