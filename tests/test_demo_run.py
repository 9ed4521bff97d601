"""`moetrace demo` end to end (slow: builds the demo model on first use, ~2.5 min on 2 cores)."""

import csv

import pytest

from moetrace.cli import main


@pytest.mark.slow
def test_demo_writes_report_and_results(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--random", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "base accuracy per domain" in out and "report" in out
    assert (tmp_path / "report.html").stat().st_size > 10_000
    with open(tmp_path / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for col in ("method", "targeted_group", "evaluated_group", "base_accuracy", "ablated_accuracy"):
        assert col in rows[0]
    methods = {r["method"] for r in rows}
    assert {"paths", "experts", "pairs"} <= methods
    assert {m for m in methods if m.startswith("random")} == {"random:paths", "random:experts", "random:pairs"}
    assert (tmp_path / "csv_demo" / "trace.parquet").exists()
