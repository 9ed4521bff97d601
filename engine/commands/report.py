"""``moetrace report STORE_OR_RUN_DIR OUT.html``: one self-contained HTML report (see engine/report.py).

    moetrace report demo_out demo_out/report.html [--title TITLE] [--results results.csv]
    moetrace report trace.zarr report.html
"""

from __future__ import annotations

from moetrace.commands._help import add_command


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 90


def add_parser(subparsers) -> None:
    p = add_command(
        subparsers, "report", examples=["report demo_out demo_out/report.html",
                                        "report trace.zarr report.html --title 'OLMoE on my prompts'"],
        help="self-contained HTML report (plots inline) of a trace store or an experiment run directory")
    p.add_argument("source", help="a trace store (.zarr) or a run directory holding trace.zarr "
                                  "[+ counts.zarr, results.csv]")
    p.add_argument("out", help="HTML file to write")
    p.add_argument("--title", default=None, help="page title (default: 'moetrace report: <source name>')")
    p.add_argument("--results", default=None,
                   help="an experiment's results CSV (default: results.csv of the run directory, if any)")
    p.set_defaults(func=run)


def run(args) -> int:
    from moetrace.report import write_report

    path = write_report(args.source, args.out, results=args.results, title=args.title)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0
