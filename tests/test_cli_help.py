"""What ``moetrace --help`` shows: every subcommand (nested ones included) ends its help with
examples that parse, every option that takes a value says what it is, and the command list
follows the workflow."""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex

import pytest

from moetrace.cli import build_parser
from moetrace.commands._help import examples


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(path of names, parser) of every subcommand, depth first, in listed order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from subcommands(sub, (*prefix, name))


ALL = list(subcommands(build_parser()))


def test_the_command_list_follows_the_workflow():
    names = [path[0] for path, _ in ALL if len(path) == 1]
    assert names[:2] == ["demo", "capture"]
    order = ["capture", "import-csv", "info", "count", "stats", "specialize", "experiment", "compare", "report",
             "decisiveness", "export-parquet", "toy"]
    assert [names.index(n) for n in order] == sorted(names.index(n) for n in order)


@pytest.mark.parametrize("path,parser", ALL, ids=[" ".join(p) for p, _ in ALL])
def test_every_subcommand_has_examples_and_help_on_every_option(path, parser):
    lines = examples(parser)
    assert lines, f"moetrace {' '.join(path)}: no examples"
    undocumented = [a.option_strings or a.dest for a in parser._actions
                    if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
                    and not isinstance(a, argparse._SubParsersAction)]
    assert not undocumented, f"moetrace {' '.join(path)}: no help for {undocumented}"
    for line in lines:
        argv = shlex.split(line)
        assert argv[:len(path)] == list(path), line
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                args = build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"example does not parse: moetrace {line}\n{err.getvalue()}")
        assert callable(args.func)
