"""Plotting plumbing shared by :mod:`moetrace.figures` and the analyses' own figures: the
``Figure`` class every figure is (no pyplot), group names, colours and axis helpers."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.figure
import numpy as np
import xarray as xr
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.ticker import MaxNLocator

from moetrace import metrics


class Figure(matplotlib.figure.Figure):
    """A matplotlib ``Figure`` that Jupyter shows as PNG by itself (``_repr_png_``), whatever the backend.

    Laid out by matplotlib's constrained layout (labels and colorbars never overlap a neighbouring
    panel); ``tight_layout()`` calls are accepted and leave that layout in place.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("layout", "constrained")
        super().__init__(*args, **kwargs)

    def tight_layout(self, *args, **kwargs) -> None:
        if not isinstance(self.get_layout_engine(), ConstrainedLayoutEngine):
            super().tight_layout(*args, **kwargs)

    def _repr_png_(self) -> bytes:
        import io

        buffer = io.BytesIO()
        FigureCanvasAgg(self).print_png(buffer)
        return buffer.getvalue()


def group_labels(counts: xr.Dataset) -> list[str]:
    """Group names of counts: label values joined by ``/`` (``all`` without labels)."""
    return ["/".join(str(v) for v in g) if g else "all" for g in metrics.group_names(counts)]


def layer_axis(ax, layers: Sequence) -> None:
    """x axis of one point per layer, labelled with the layer ids."""
    ax.set_xticks(np.arange(len(layers)), [str(v) for v in layers], fontsize=7)
    ax.set_xlabel("layer", fontsize=8)
    ax.tick_params(labelsize=7)


def integer_axis(axis) -> None:
    """Ticks at whole numbers only (expert ids, ranks): never 2.5 or 0.25."""
    axis.set_major_locator(MaxNLocator(integer=True))


def legend_right(ax) -> None:
    """The legend outside the axes, on the right."""
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))


def palette(n: int) -> list:
    """``n`` distinguishable colours: tab10, then tab20's lighter shades, then evenly spaced hues."""
    from matplotlib import colormaps

    base = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2])
    if n <= len(base):
        return base[:n]
    return [colormaps["hsv"](i / n) for i in range(n)]
