"""Progress for long work: bars on a terminal and in a notebook, plain lines in a log.

``tqdm`` redraws its bar with carriage returns; written to a file or a CI log that becomes one
line per update. Every long loop in moetrace uses :func:`tqdm` from here instead: on a terminal
(standard error is a TTY) or in a Jupyter kernel it is ``tqdm.auto.tqdm`` (a widget in Jupyter
when ipywidgets is installed, text otherwise); elsewhere (a log, a pipe, CI) it writes one plain
line when the loop starts, one at most every :data:`LOG_INTERVAL` seconds, and one when it ends,
each with the count, the elapsed time and the rate. ``MOETRACE_PROGRESS=1`` forces the bars on,
``MOETRACE_PROGRESS=0`` turns progress off entirely (no bars, no lines).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm as _tqdm
from tqdm.std import tqdm as _std_tqdm

__all__ = ["LOG_INTERVAL", "bars_enabled", "in_notebook", "tqdm", "transformers_bars"]

#: Seconds between two progress lines in a log.
LOG_INTERVAL = 30.0


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell), where stderr is no TTY but bars render."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _forced() -> bool | None:
    forced = os.environ.get("MOETRACE_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return None


def bars_enabled() -> bool:
    """True when progress bars should be drawn: stderr is a terminal or this is a notebook, unless
    MOETRACE_PROGRESS says otherwise."""
    forced = _forced()
    if forced is not None:
        return forced
    if in_notebook():
        return True
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


class _Discard:
    """Where a log-line bar sends tqdm's own (carriage-return) output."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class _LogLines(_std_tqdm):
    """A tqdm that writes plain lines to standard error instead of redrawing a bar (for logs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(file=_Discard(), mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, dynamic_ncols=False,
                      ncols=None, ascii=True)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        d = self.format_dict
        done = f"{d['n']:,}" + (f"/{d['total']:,}" if d.get("total") else "")
        rate = f", {d['n'] / d['elapsed']:.3g} {d['unit']}/s" if d["elapsed"] > 0 and d["n"] else ""
        label = f"{d['prefix']}: " if d.get("prefix") else ""
        try:
            print(f"[progress] {label}{done} {d['unit']} after {self.format_interval(d['elapsed'])}{rate}",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr gone
            pass
        return True


def tqdm(*args: Any, disable: bool = False, **kwargs: Any) -> _tqdm:
    """A progress bar (terminal, notebook), plain progress lines (a log), or nothing when ``disable``
    or ``MOETRACE_PROGRESS=0`` (module docstring); takes ``tqdm``'s arguments."""
    if disable or _forced() is False:
        return _tqdm(*args, disable=True, **kwargs)
    if bars_enabled():
        return _tqdm(*args, **kwargs)
    return _LogLines(*args, **kwargs)


@contextlib.contextmanager
def transformers_bars() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights", ...) drawn only where moetrace draws bars:
    in a log each redraw would be a line. Restores transformers' setting on exit."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not bars_enabled():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
