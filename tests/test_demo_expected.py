"""The demo's headline numbers, from the shipped demo model, equal the committed expected summary.

``tests/expected/demo_summary.json`` is ``demo_out/summary.json`` of ``make demo`` at the commit
that shipped the model (x86_64 AVX-512, torch 2.13.0). The shipped weights are the same bits on
every machine; inference can round differently on another CPU, which can flip a question whose two
best options are within rounding of each other. The tolerance allows that: accuracy effects within
0.01 (two questions of one domain's 200, averaged over four domains, and more), loss effects within
0.005 nats, base accuracies within 0.011; and every primary test must reach the same verdict at 0.05
after Holm.
"""

import json
from pathlib import Path

import pytest

EXPECTED = Path(__file__).parent / "expected" / "demo_summary.json"
TOLERANCE = {"drop": 0.01, "loss_increase": 0.005, "answer_loss_increase": 0.005, "other_loss_increase": 0.005}


def test_demo_headline_equals_the_committed_summary(tmp_path):
    from moetrace.demo.model import SHIPPED_DIR, check_shipped_model, load_demo_model
    from moetrace.demo.run import run_demo_experiment

    check_shipped_model()
    model, tok = load_demo_model(SHIPPED_DIR)
    got = run_demo_experiment(model, tok, SHIPPED_DIR, tmp_path, progress=False)
    want = json.loads(EXPECTED.read_text())
    assert got["scoring"] == want["scoring"] == "answer"
    assert got["n_random"] == want["n_random"]
    for group, row in want["base"].items():
        assert got["base"][group]["base_accuracy"] == pytest.approx(row["base_accuracy"], abs=0.011)
        assert got["base"][group]["testable"] == row["testable"]
    for method in ("experts", "paths", "pairs"):
        for measure, tol in TOLERANCE.items():
            for key in ("targeted", "off_target", "random", "targeted_minus_random"):
                assert got[method][measure][key]["estimate"] == pytest.approx(
                    want[method][measure][key]["estimate"], abs=tol), (method, measure, key)
    verdict = {(t["method"], t["measure"]): t["p_holm"] < 0.05 for t in want["primary_tests"]}
    assert {(t["method"], t["measure"]): t["p_holm"] < 0.05 for t in got["primary_tests"]} == verdict
