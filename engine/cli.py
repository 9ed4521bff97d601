"""The ``moetrace`` command line.

Subcommands live in ``engine/commands/*.py`` (see that package's docstring). A
:class:`moetrace.errors.MoetraceError` raised by a command is printed as one line on
stderr and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import warnings

import moetrace
import moetrace.commands
from moetrace.errors import MoetraceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetrace",
        description="Capture, count, analyze and intervene on Mixture-of-Experts routing. The commands are "
                    "listed in the order of the usual workflow: demo; capture (or import-*) a trace; info; count "
                    "it; stats and specialize on the counts; experiment (ablate); compare; report; the seed-003 "
                    "analyses; export; toy. `moetrace COMMAND --help` ends with examples.",
    )
    parser.add_argument("--version", action="version", version=f"moetrace {moetrace.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [importlib.import_module(f"moetrace.commands.{m.name}")
               for m in pkgutil.iter_modules(moetrace.commands.__path__)
               if not m.name.startswith("_")]  # _-prefixed: helpers of the commands, not commands
    for module in sorted(modules, key=lambda m: (getattr(m, "ORDER", 1000), m.__name__)):
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    shown = warnings.formatwarning
    warnings.formatwarning = _warning_line(args.command)
    try:
        code = args.func(args)
    except MoetraceError as exc:
        print(f"moetrace {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moetrace {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_went_away()
    finally:
        warnings.formatwarning = shown
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _reader_went_away()
    return 0 if code is None else int(code)


def _warning_line(command: str):
    """``warnings.formatwarning`` for the command line: one line naming the command, not Python's source
    excerpt (a formatter, not a ``showwarning``: ``catch_warnings(record=True)`` still records)."""
    def format_line(message, category, filename, lineno, line=None) -> str:
        kind = "" if issubclass(category, UserWarning) and category.__module__.startswith(("moetrace", "builtins")) \
            else f" ({category.__name__})"
        return f"moetrace {command}: warning{kind}: {message}\n"
    return format_line


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (``moetrace info ... | head``): stop quietly, like a Unix tool.

    stdout is pointed at /dev/null so that Python's final flush at exit cannot raise again;
    the status is 128 + SIGPIPE, what a shell reports for a command killed by that signal.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


if __name__ == "__main__":
    sys.exit(main())
