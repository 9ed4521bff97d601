"""The seed-003 analysis commands, one per :data:`moetrace.analysis.ANALYSES` entry (each declared in
its module, ``engine/analysis/<name>.py``, with its example). Every command takes ``--layers``,
``--num-tokens`` and ``--out DIR`` and writes its numbers (CSV, and JSON or a Zarr dataset) and its
figure (PNG and PDF) into DIR; ``moetrace report RUN`` shows them when DIR is ``RUN/analysis``.
"""

from __future__ import annotations

from moetrace.commands._help import add_command

#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 100


def add_parser(subparsers) -> None:
    from moetrace.analysis import ANALYSES

    for analysis in ANALYSES:
        p = add_command(subparsers, analysis.command, help=analysis.help, examples=[analysis.example])
        analysis.arguments(p)
        p.set_defaults(func=analysis.run)
