"""``moetrace specialize``: seed 000's specialized paths / experts / pairs of one group, as targets.

    moetrace specialize COUNTS.zarr --method paths|experts|pairs --group domain=biology,lang=en
                        [--threshold X] [--min-layer-index N] --out targets.json [--quiet]

Writes seed 000's bare JSON ``{"<layer>": [...]}`` (see :mod:`moetrace.targets`); defaults follow
the notebook (paths and experts skip the first recorded layer; thresholds 1 / 5 / 5).
"""

from __future__ import annotations

import argparse
import sys

from moetrace.commands._help import add_command
from moetrace.errors import MoetraceError
from moetrace.targets import KINDS


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 60


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "specialize", help="select a group's specialized paths, experts or pairs (seed 000)",
                    examples=["specialize counts.zarr --method experts --group domain=math --threshold 2 "
                              "--out math_experts.json",
                              "specialize counts.zarr --method paths --group domain=biology,lang=en --out bio_en_paths.json"])
    p.add_argument("counts", help="counts written by `moetrace count` (.zarr)")
    p.add_argument("--method", required=True, choices=sorted(KINDS),
                   help="paths: top-1 layer-to-layer paths; experts: top-1 expert per layer; pairs: ordered top-2")
    p.add_argument("--group", required=True, help="target group as label=value[,label=value], e.g. domain=biology,lang=en")
    p.add_argument("--threshold", type=float, default=None,
                   help="multiplier of the group's share of samples (default: paths 1, experts 5, pairs 5). An item "
                        "is kept when its share of samples from the group >= group share x threshold; that share is "
                        "at most 1, so threshold x group share > 1 selects nothing: with G equal groups the default "
                        "5 needs G >= 5 (the warning names the largest threshold that still selects something)")
    p.add_argument("--min-layer-index", type=int, default=None,
                   help="first layer position used (default: 1 for paths and experts, 0 for pairs)")
    p.add_argument("--out", required=True, help="targets JSON to write (seed 000's bare format)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def parse_group(text: str) -> dict[str, str]:
    """``"domain=biology,lang=en"`` -> ``{"domain": "biology", "lang": "en"}``."""
    group: dict[str, str] = {}
    for part in text.split(","):
        label, sep, value = part.partition("=")
        label, value = label.strip(), value.strip()
        if not sep or not label or not value:
            raise MoetraceError(f"--group: expected label=value[,label=value] (e.g. domain=biology,lang=en), got {text!r}")
        if label in group:
            raise MoetraceError(f"--group: label {label!r} given twice in {text!r}")
        group[label] = value
    return group


def nothing_selected_warning(selection) -> str:
    """The warning for an empty selection: why, and the largest threshold that selects something."""
    share, threshold = selection.group_share, selection.threshold
    why = ""
    if threshold * share > 1:
        why = (f" threshold {threshold:g} x group share {share:.4f} = {threshold * share:.3g} > 1, which no item can "
               f"reach (its share of samples from the group is at most 1);")
    if selection.max_threshold > 0:
        return (f"warning: nothing selected;{why} the largest --threshold that selects something here is "
                f"{_at_most(selection.max_threshold)}")
    return f"warning: nothing selected;{why} the group has no {selection.method} samples in these layers"


def _at_most(value: float) -> str:
    """``value`` rounded down to 3 significant digits (1.7966 -> 1.79), more only where that would reach
    0: passing it back selects something (rounding to nearest would round 1.7966 up, past the value)."""
    import math

    for digits in range(3, 18):
        scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
        text = f"{math.floor(value * scale) / scale:.{digits}g}"
        if 0 < float(text) <= value:
            return text
    return repr(value)


def run(args: argparse.Namespace) -> int:
    from moetrace.counting import load_counts
    from moetrace.io.base import check_output_path

    check_output_path(args.out, args.overwrite, (args.counts,), what="the counts file")  # before any work
    counts = load_counts(args.counts)
    from moetrace import metrics
    from moetrace.targets import Targets

    selection = metrics.specialized(
        counts, args.method, parse_group(args.group), threshold=args.threshold, min_layer_index=args.min_layer_index
    )
    Targets.from_specialized(args.method, selection).save_bare(args.out, args.method)
    if not args.quiet:
        group = ",".join(f"{k}={v}" for k, v in selection.group.items())
        covered = int(selection.n_samples.sum())
        print(
            f"{len(selection)} specialized {args.method} for {group} (threshold {selection.threshold:g} x group share "
            f"{selection.group_share:.4f}) in {len(set(selection.layer.tolist()))} layers; they cover {covered:,} of the "
            f"group's {selection.group_samples:,} {args.method} samples; wrote {args.out}"
        )
        if len(selection) == 0:
            print(nothing_selected_warning(selection), file=sys.stderr)
    return 0
