"""The seed-003 analysis commands, one per :data:`moetrace.analysis.ANALYSES` entry (each declared in
its module, ``engine/analysis/<name>.py``, with its example). Every command takes ``--layers``,
``--num-tokens`` and ``--out DIR`` and writes its numbers (CSV, and JSON or a Zarr dataset) and its
figure (PNG and PDF) into DIR; ``moetrace report RUN`` shows them when DIR is ``RUN/analysis``.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from moetrace.analysis import ANALYSES

    for analysis in ANALYSES:
        p = subparsers.add_parser(analysis.command, help=analysis.help, description=analysis.help,
                                  epilog=f"example:\n  moetrace {analysis.example}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        analysis.arguments(p)
        p.set_defaults(func=analysis.run)
