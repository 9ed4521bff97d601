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

import moetrace
import moetrace.commands
from moetrace.errors import MoetraceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moetrace",
        description="Capture, count, analyze and intervene on Mixture-of-Experts routing.",
    )
    parser.add_argument("--version", action="version", version=f"moetrace {moetrace.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(moetrace.commands.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):  # helpers of the commands, not commands
            continue
        module = importlib.import_module(f"moetrace.commands.{module_info.name}")
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
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
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return _reader_went_away()
    return 0 if code is None else int(code)


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
