"""How a subcommand presents itself in ``--help``: its one line in the command list, a description,
and, last, examples a user can copy (``tests/test_cli_help.py`` parses every one of them)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

EXAMPLES = "examples:"


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, except that the examples keep their lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLES):
            return text
        return super()._fill_text(text, width, indent)


def add_command(subparsers, name: str, *, help: str, examples: Sequence[str],
                description: str | None = None) -> argparse.ArgumentParser:
    """``subparsers.add_parser(name)`` with ``help`` in the command list, ``description`` (default: ``help``)
    on top of its ``--help`` and ``examples`` (command lines without the leading ``moetrace``) at the end."""
    epilog = EXAMPLES + "".join(f"\n  moetrace {e}" for e in examples)
    return subparsers.add_parser(name, help=help, description=description or help, epilog=epilog,
                                 formatter_class=_Formatter)


def examples(parser: argparse.ArgumentParser) -> list[str]:
    """The example command lines of a parser made by :func:`add_command` (without ``moetrace``)."""
    text = parser.epilog or ""
    if not text.startswith(EXAMPLES):
        return []
    return [line.strip()[len("moetrace "):] for line in text.splitlines()[1:] if line.strip()]
