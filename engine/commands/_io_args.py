"""Arguments and messages shared by the importer commands (``import_*.py``, ``export_*.py`` here).

Not a command itself: ``moetrace.cli`` loads every module of this package whose name does not
start with an underscore.
"""

from __future__ import annotations

import argparse
import sys


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_common(parser: argparse.ArgumentParser, store_out: bool = True) -> None:
    if store_out:
        parser.add_argument("--n-experts", type=positive, default=None,
                            help="number of experts (default: largest expert id + 1)")
        parser.add_argument("--chunk-rows", type=positive, default=None, help="store rows per chunk (default: auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def report(store, out: str, quiet: bool) -> None:
    if not quiet:
        print(f"{out}: {len(store)} tokens, {store.n_layers} layers, {store.n_experts} experts, "
              f"top-{store.top_k}, labels {store.label_names}", file=sys.stderr)
