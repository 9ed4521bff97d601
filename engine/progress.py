"""Progress bars that show on a terminal and in a notebook, never in a log.

``tqdm`` redraws its bar with carriage returns; written to a file or a CI log that becomes one
line per update. Every long loop in moetrace uses :func:`tqdm` from here instead: it is
``tqdm.auto.tqdm`` (a widget in Jupyter when ipywidgets is installed, text otherwise) with
``disable`` forced on unless standard error is a TTY or the code runs in a Jupyter kernel, so
logs hold only the result lines. ``MOETRACE_PROGRESS=1`` forces the bars on (``0`` forces them off).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm as _tqdm

__all__ = ["bars_enabled", "in_notebook", "tqdm"]


def in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython's ZMQ shell), where stderr is no TTY but bars render."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def bars_enabled() -> bool:
    """True when progress bars should be drawn: stderr is a terminal or this is a notebook, unless
    MOETRACE_PROGRESS says otherwise."""
    forced = os.environ.get("MOETRACE_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if in_notebook():
        return True
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def tqdm(*args: Any, disable: bool = False, **kwargs: Any) -> _tqdm:
    """``tqdm.auto.tqdm(*args, **kwargs)``, disabled when ``disable`` or when bars are off (not a TTY)."""
    return _tqdm(*args, disable=disable or not bars_enabled(), **kwargs)
