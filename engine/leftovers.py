"""What an interrupted write leaves beside its output, and the one rule for it.

Every moetrace writer builds ``OUT`` in ``OUT.partial-<pid>`` and publishes it by renaming
(:func:`moetrace.io.base.staged_store`, :func:`moetrace.counting.files.save_counts`, checkpoint
ranges); an overwrite first moves the old ``OUT`` to ``OUT.old-<pid>``; importers that sort on
disk work in ``.OUT.partial-<pid>.parts-*``. A process killed on the way leaves these behind.
They are never inputs: archive discovery skips them (:func:`leftover`), and the next writer of
the same output deletes those whose process is gone (:func:`clean`). An ``OUT.old-<pid>`` is
deleted only while ``OUT`` exists: without ``OUT`` it holds the last complete version.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_NAME = re.compile(r"^(?P<hidden>\.)?(?P<out>.+?)\.(?P<kind>partial|old)-(?P<pid>\d+)(?P<parts>\.parts-.*)?$")


def leftover(name: str) -> tuple[str, str, int] | None:
    """``(output name, "partial" | "old" | "parts", pid)`` when ``name`` is a writer's leftover, else None."""
    m = _NAME.match(name)
    if m is None or bool(m.group("hidden")) != bool(m.group("parts")):
        return None
    kind = "parts" if m.group("parts") else m.group("kind")
    return m.group("out"), kind, int(m.group("pid"))


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def clean(directory: Path, out_name: str | None = None) -> list[Path]:
    """Delete the leftovers in ``directory`` (of output ``out_name`` only, when given) whose process
    is gone; an ``.old`` one only while its output exists. Returns what was deleted."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for path in entries:
        found = leftover(path.name)
        if found is None or (out_name is not None and found[0] != out_name) or alive(found[2]):
            continue
        if found[1] == "old" and not (path.parent / found[0]).exists():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def describe(path: Path | str) -> str:
    """One clause on a leftover, for a message: whose it is and whether it can go."""
    name = Path(str(path).rstrip("/")).name
    out, kind, pid = leftover(name)
    if alive(pid):
        return f"{name} (being written by process {pid})"
    if kind == "old":
        return f"{name} (the previous {out}, left by an interrupted overwrite)"
    return f"{name} (left by process {pid}, which is gone: safe to delete)"
