"""What a report section is and what it can read: :class:`Section`, :class:`Context`, and the
escaped HTML pieces sections are written with.

Sections are declared next to what they show: the count and experiment sections in
:mod:`moetrace.report`, each seed-003 analysis' section in its own module (its
``ANALYSIS.section``, :mod:`moetrace.analysis`). A section owns the names of the files it
reads (its ``needs``); :func:`moetrace.report.write_report` collects them all in page order.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from moetrace import metrics
from moetrace.counting import count
from moetrace.errors import MoetraceError
from moetrace.kernels.counting import STATS
from moetrace.store import TraceStore

#: Where a run directory keeps what the analysis commands wrote (``--out RUN/analysis``).
ANALYSIS_DIR = "analysis"

_DPI = 90


def escape(text: Any) -> str:
    return html.escape(str(text), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    """A cell value as text: integers as is, floats to ``digits`` significant digits, NaN as '-'."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}"
    return str(value)


def size(n: int | None) -> str:
    """Bytes as text in B / KiB / MiB / GiB / TiB ('-' when unknown)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def html_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], text_cols: int = 1) -> str:
    """An escaped HTML table; the first ``text_cols`` columns are left-aligned."""
    head = "".join(f'<th class="t">{escape(c)}</th>' if i < text_cols else f"<th>{escape(c)}</th>"
                   for i, c in enumerate(columns))
    body = []
    for row in rows:
        cells = "".join(f'<td class="t">{escape(fmt(v))}</td>' if i < text_cols else f"<td>{escape(fmt(v))}</td>"
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def img(fig: Figure, alt: str) -> str:
    """``<img>`` holding ``fig`` as an inline base64 PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{data}">'


def note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def section_html(sec_id: str, heading: str, body: str) -> str:
    return f'<section id="{escape(sec_id)}"><h2>{escape(heading)}</h2>\n{body}\n</section>'


def group_matrix(da: xr.DataArray, counts: xr.Dataset) -> np.ndarray:
    """A (group..., rest...) DataArray as [G, rest...] in :func:`moetrace.metrics.group_names` order."""
    return metrics.flatten_groups(da, metrics.group_dims(counts))


@dataclass
class Context:
    """What a section's render function can read."""

    store: TraceStore
    counts: xr.Dataset
    origin: str
    groups: list[str]
    results: pd.DataFrame | None = None
    run_dir: Path | None = None
    cache: dict = field(default_factory=dict)

    @property
    def analysis_dir(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / ANALYSIS_DIR

    def has(self, need: str) -> bool:
        """Whether the data named by ``need`` is present (see :class:`Section`)."""
        if need in STATS:
            return need in self.counts.data_vars
        if need == "results":
            return self.results is not None
        if need == "coverage":
            return self.results is not None and "coverage" in self.results.columns
        if need == "probs":
            return self.store.has_probs
        if "|" in need:  # alternatives: any of them
            return any(self.has(n) for n in need.split("|"))
        if need == "groups":
            return bool(metrics.group_dims(self.counts))
        if need == "generated":  # the trace holds generated (decoded) tokens besides its prompts
            return int(self.by_generated()["tokens"].sel(generated="generated")) > 0
        if "." in need or "/" in need:  # a file name, path or glob pattern under the run directory
            return self.run_dir is not None and any(self.run_dir.glob(need))
        raise MoetraceError(f"unknown report need {need!r}")

    def by_generated(self) -> xr.Dataset:
        """The trace's expert counts split into prompt and generated tokens (counted once, cached)."""
        if "generated" not in self.cache:
            self.cache["generated"] = count(self.store, stats=["experts"], by=["generated"], progress=False)
        return self.cache["generated"]

    def best_layer(self) -> int | None:
        """Layer id with the largest chi-square (None without experts counts or when all are NaN)."""
        if "best" not in self.cache:
            best = None
            if "experts" in self.counts.data_vars:
                chi2 = metrics.layer_ranking(self.counts)["chi2"].values
                if not np.all(np.isnan(chi2)):
                    best = int(self.counts["layer"].values[int(np.nanargmax(chi2))])
            self.cache["best"] = best
        return self.cache["best"]


@dataclass(frozen=True)
class Section:
    """One report section.

    id: the HTML id and anchor; title: its heading; nav: its table-of-contents label;
    needs: the data it reads, each one of: a count statistic (a name of
    :data:`moetrace.kernels.counting.STATS`); ``results`` (an experiment table); ``coverage`` (its
    coverage column); ``probs`` (``routing/probs`` in the store); ``groups`` (counts grouped by a
    label); ``generated`` (the trace holds generated tokens); a file name, path or glob pattern
    under the run directory, which the section owns (``summary.json``,
    ``analysis/similarity.zarr``, ``analysis/profile_layer*_expert*.json``); or alternatives joined
    by ``|`` (``probs|analysis/decisiveness.zarr``: either will do);
    render: Context -> HTML body. ``always``: shown with a note naming the missing count
    statistics when some are absent (else the section is left out when its data is missing).
    """

    id: str
    title: str
    nav: str
    needs: tuple[str, ...]
    render: Callable[[Context], str]
    always: bool = False


def open_dataset(path: Path) -> xr.Dataset:
    """An analysis' Zarr dataset (:func:`moetrace.analysis.load_result`)."""
    from moetrace.analysis._common import load_result

    return load_result(path)
