"""Languages vs domains: at which depth routing separates groups by language and at which by domain.

Per layer, the generalized Jensen-Shannon divergence between the groups' expert distributions,
weighted by the groups' shares of the selections, equals the mutual information I(E; G) between
the selected expert E and the group G (in bits). With a domain label D and a language label L
(G = (D, L)) the chain rule splits it exactly, both ways:

    I(E; D, L) = I(E; L) + I(E; D | L) = I(E; D) + I(E; L | D)

``by_lang`` = I(E; L) is the divergence between languages (domains pooled), ``by_domain`` = I(E; D)
between domains; ``domain_given_lang`` / ``lang_given_domain`` are the parts left once the other
label is known. Each is also given normalized by log2(E) (its upper bound is min(log2 E, log2 G)).
Expert selections of all top-k ranks are the distribution (``experts`` counts summed over ranks).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from moetrace import metrics
from moetrace.errors import MoetraceError


def _mi(joint: np.ndarray) -> np.ndarray:
    """Mutual information (bits) between the first axis and the last axis of joint counts [L, A, E]."""
    total = joint.sum(axis=(1, 2), keepdims=True)
    p = joint / np.where(total > 0, total, 1)
    pa = p.sum(axis=2, keepdims=True)
    pe = p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (pa * pe)), 0.0)
    return terms.sum(axis=(1, 2))


def jensen_shannon(counts: xr.Dataset) -> xr.Dataset:
    """Per layer, the weighted JS divergence between all groups' expert distributions (= I(E; G), bits),
    and with labels ``domain`` and ``lang`` both grouped, its split by language and by domain.

    Returns a Dataset over ``layer``: ``jsd`` (and ``by_domain``, ``by_lang``, ``domain_given_lang``,
    ``lang_given_domain`` when both labels are group dims), plus ``*_norm`` = value / log2(E).
    """
    metrics.check_counts(counts, ["experts"])
    gdims = metrics.group_dims(counts)
    if not gdims:
        raise MoetraceError("counts: the divergence between groups needs counts grouped by at least one label")
    sel = counts["experts"].sum("rank").transpose(*gdims, "layer", "expert")
    E = counts.sizes["expert"]
    flat = metrics.flatten_groups(sel, gdims).astype(np.float64)  # [G, L, E]
    data = {"jsd": _mi(flat.transpose(1, 0, 2))}
    if "domain" in gdims and "lang" in gdims:
        other = [d for d in gdims if d not in ("domain", "lang")]
        s = sel.sum(other) if other else sel
        dl = s.transpose("domain", "lang", "layer", "expert").values.astype(np.float64)  # [D, Lg, L, E]
        by_domain = _mi(dl.sum(1).transpose(1, 0, 2))
        by_lang = _mi(dl.sum(0).transpose(1, 0, 2))
        both = _mi(dl.reshape(-1, *dl.shape[2:]).transpose(1, 0, 2))
        data.update(by_domain=by_domain, by_lang=by_lang, domain_given_lang=both - by_lang,
                    lang_given_domain=both - by_domain)
    ds = xr.Dataset({k: ("layer", v) for k, v in data.items()}, coords={"layer": counts["layer"].values},
                    attrs={"n_experts": E, "groups": ", ".join(gdims), "analysis": "lang_domain"})
    for name in list(ds.data_vars):
        ds[f"{name}_norm"] = ds[name] / np.log2(E)
    return ds


def table(ds: xr.Dataset) -> pd.DataFrame:
    return ds.to_dataframe().reset_index()
