"""``moetrace count``: stream a trace store into count tensors saved as Zarr.

    moetrace count ARCHIVE OUT.zarr --stats experts,paths,pairs,temporal,coact (see --help for all)
                   [--by domain,lang] [--skip-shared-prefix] [--generated-only]
                   [--positions A:B] [--group label=v1,v2]... [--vocab-size V]
                   [--workers N | --scheduler ADDRESS] [--range-rows R] [--checkpoint DIR]
                   [--overwrite] [--quiet]

ARCHIVE is a store, a directory of stores or a glob (see engine/counting/archive.py).

The output is the Dataset of :func:`moetrace.counting.count`, written with
``moetrace.counting.save_counts`` (crash-safe: written beside OUT, renamed when complete;
read it with ``xarray.open_zarr`` or ``moetrace.counting.load_counts``).
"""

from __future__ import annotations

import argparse
import warnings

from moetrace.commands._help import add_command
from moetrace.errors import MoetraceError


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 40


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _positions(text: str) -> tuple[int, int]:
    try:
        a, b = text.split(":")
        return int(a), int(b)
    except ValueError:
        raise MoetraceError(f"--positions: expected START:STOP integers (e.g. 10:200), got {text!r}") from None


def _groups(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        label, sep, values = item.partition("=")
        if not sep or not label or not values:
            raise MoetraceError(f"--group: expected LABEL=VALUE[,VALUE...] (e.g. domain=biology,math), got {item!r}")
        out.setdefault(label.strip(), []).extend(_csv(values))
    return out


class _StatsArgument(argparse.Action):
    """``--stats``: its help lists the statistics registered in kernels/counting.py.

    Built only when help is printed, so the CLI does not import Numba to start.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)

    @property
    def help(self) -> str:
        from moetrace.kernels.counting import stats_help

        return "comma-separated statistics (default: experts; tokens is always counted): " + "; ".join(
            stats_help().splitlines())

    @help.setter
    def help(self, value) -> None:  # argparse assigns the (absent) help; the property is the help
        pass


#: Seconds ``--scheduler`` waits for its scheduler before giving up.
SCHEDULER_TIMEOUT_S = 10


def _client(args: argparse.Namespace):
    """A ``distributed.Client`` for ``--workers N`` (a LocalCluster on loopback, processes) or ``--scheduler``."""
    if args.workers is not None and args.scheduler:
        raise MoetraceError("--workers and --scheduler: expected one of them, got both")
    if args.workers is None and not args.scheduler:
        return None
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise MoetraceError("--workers/--scheduler: needs the dask extra (pip install 'moetrace[dask]')") from None
    if args.scheduler:
        try:
            return Client(args.scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError, TypeError) as exc:  # refused, unreachable, a malformed address
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise MoetraceError(
                f"--scheduler {args.scheduler}: cannot reach a Dask scheduler there within {SCHEDULER_TIMEOUT_S} s "
                f"({reason[:200]})") from None
    if args.workers < 1:
        raise MoetraceError(f"--workers: expected a positive number of worker processes, got {args.workers}")
    import os

    # one range at a time per worker; its Numba threads share this machine's cores
    threads = str(max(1, (os.cpu_count() or 1) // args.workers))
    import logging

    # silence_logs: the nannies' start/stop notices (and a restarted worker's) stay out of the terminal
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None, silence_logs=logging.ERROR,
                           env={"NUMBA_NUM_THREADS": threads, "OMP_NUM_THREADS": threads})
    return Client(cluster)


def run_count(args: argparse.Namespace) -> int:
    from moetrace.counting import count, save_counts, stores_of
    from moetrace.io.base import check_output_path

    # say so before counting, not after (the count itself warns about skipped entries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inputs = tuple(stores_of(args.store))
    check_output_path(args.out, args.overwrite, inputs, what="an input store")
    client = _client(args)
    try:
        ds = _count(args, count, client)
    finally:
        if client is not None:
            cluster = client.cluster if args.workers is not None else None
            client.close()
            if cluster is not None:
                cluster.close()
    save_counts(ds, args.out, overwrite=args.overwrite)
    if not args.quiet:
        total = int(ds["tokens"].sum())
        extra = (f", after dropping each sequence's first {ds.attrs['shared_prefix_tokens']} tokens (the prefix every "
                 "sequence shares)" if "shared_prefix_tokens" in ds.attrs else "")
        print(f"counted {total:,} tokens into {args.out}: {', '.join(v for v in ds.data_vars)}{extra}")
    return 0


def _count(args: argparse.Namespace, count, client):
    return count(
        args.store,
        stats=_csv(args.stats),
        by=_csv(args.by) if args.by else [],
        skip_shared_prefix=args.skip_shared_prefix,
        generated_only=args.generated_only,
        positions=_positions(args.positions) if args.positions else None,
        groups=_groups(args.group) if args.group else None,
        vocab_size=args.vocab_size,
        progress=not args.quiet,
        client=client,
        range_rows=args.range_rows,
        checkpoint=args.checkpoint,
    )


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers, "count",
        examples=["count trace.zarr counts.zarr --stats experts,paths,pairs,temporal --by domain,lang",
                  "count 'traces/*.zarr' counts.zarr --stats experts --by domain --workers 2 --checkpoint ckpt"],
        help="count expert choices, paths, pairs, transitions, co-activation into a Zarr counts file",
        description="Stream a trace store through the Numba counters and write the counts (xarray Dataset) to Zarr.",
    )
    p.add_argument("store", metavar="ARCHIVE",
                   help="trace store (Zarr directory), a directory of stores, or a glob (quote it); "
                        "local or an fsspec URL (s3://..., needs its filesystem package)")
    p.add_argument("out", help="output counts file (Zarr directory, e.g. counts.zarr)")
    p.add_argument("--stats", default="experts", action=_StatsArgument, metavar="NAME[,NAME...]")
    p.add_argument("--by", default="", help="comma-separated label names to group by, e.g. domain,lang; "
                   "generated splits prompt from generated tokens (values prompt, generated)")
    p.add_argument("--skip-shared-prefix", action="store_true",
                   help="drop the token prefix shared by every sequence (seed 000's last_shared_tok)")
    p.add_argument("--generated-only", action="store_true", help="count only generated tokens")
    p.add_argument("--positions", help="keep positions START:STOP (start inclusive, stop exclusive)")
    p.add_argument("--group", action="append", metavar="LABEL=V1,V2",
                   help="keep only these label values (repeatable); a --by label keeps exactly these coordinates")
    p.add_argument("--vocab-size", type=int, help="vocabulary size V for the vocab statistic")
    p.add_argument("--workers", type=int, help="count on a LocalCluster of N worker processes on this machine")
    p.add_argument("--scheduler", metavar="ADDRESS", help="count on the Dask cluster at ADDRESS (tcp://host:8786)")
    p.add_argument("--range-rows", type=int,
                   help="rows per task (rounded down to whole chunks; default about 1.3e8 routing rows)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="keep each finished range's counts in DIR; a rerun continues where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run_count)
