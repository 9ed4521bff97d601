"""The one JSONL reader: every file of one JSON value per line (documents, questions, labels,
vLLM / SGLang / Megatron routing logs) is read here, with one error style:
``<path>: line <n>: <what is wrong>``, one line, no traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from moetrace.errors import MoetraceError


def iter_json_lines(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON)`` for every non-blank line of ``path``, streamed."""
    path = Path(path)
    if not path.is_file():
        raise MoetraceError(f"{path}: expected an existing JSONL file, found none")
    try:
        with open(path, "rb") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield line_no, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise MoetraceError(f"{path}: line {line_no}: invalid JSON ({exc.msg}; truncated file?)") from None
                except UnicodeDecodeError:
                    raise MoetraceError(f"{path}: line {line_no}: not UTF-8 text") from None
                except RecursionError:
                    raise MoetraceError(f"{path}: line {line_no}: JSON nested too deeply") from None
    except OSError as exc:
        raise MoetraceError(f"{path}: unreadable ({exc.strerror})") from None


def read_json_objects(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """``[(line number, object)]``: every non-blank line of ``path`` must be a JSON object."""
    rows = []
    for line_no, value in iter_json_lines(path):
        if not isinstance(value, dict):
            raise MoetraceError(f"{path}: line {line_no}: expected a JSON object, got {short(value)}")
        rows.append((line_no, value))
    return rows


def short(value: Any) -> str:
    """``repr(value)``, cut to 60 characters, for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
