"""Progress bars that show only on a terminal.

``tqdm`` redraws its bar with carriage returns; written to a file or a CI log that becomes one
line per update. Every long loop in moetrace uses :func:`tqdm` from here instead: it is
``tqdm.auto.tqdm`` with ``disable`` forced on when standard error is not a TTY, so logs hold
only the result lines. ``MOETRACE_PROGRESS=1`` forces the bars on (``0`` forces them off).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm as _tqdm

__all__ = ["bars_enabled", "tqdm"]


def bars_enabled() -> bool:
    """True when progress bars should be drawn: stderr is a terminal, unless MOETRACE_PROGRESS says otherwise."""
    forced = os.environ.get("MOETRACE_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced stream
        return False


def tqdm(*args: Any, disable: bool = False, **kwargs: Any) -> _tqdm:
    """``tqdm.auto.tqdm(*args, **kwargs)``, disabled when ``disable`` or when bars are off (not a TTY)."""
    return _tqdm(*args, disable=disable or not bars_enabled(), **kwargs)
