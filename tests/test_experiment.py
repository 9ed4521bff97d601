"""The ablation experiment runner on a tiny random model, and its summary arithmetic."""

import numpy as np
import pytest
import torch

from engine.aggregate import load_counts
from engine.demo.data import build_tokenizer, make_questions
from engine.evaluate import multiple_choice_accuracy
from engine.experiment import random_like, run_experiment, summarize
from engine import metrics
from engine.intervene import intervene
from engine.targets import Targets
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = tiny_model("olmoe", vocab_size=len(tok))
    questions = make_questions(n_per_group=3, seed=1)
    out = tmp_path_factory.mktemp("exp")
    table = run_experiment(model, tok, questions, out, methods=("experts", "paths"), n_random=2,
                           thresholds={"experts": 2.0}, progress=False)
    return model, tok, questions, out, table


def test_table_has_a_row_per_method_target_evaluated_and_seed(run):
    model, tok, questions, out, table = run
    groups = sorted({q["domain"] for q in questions})
    n = len(table["method"])
    assert n == 2 * len(groups) * (1 + 2) * len(groups)
    assert set(table["method"]) == {"experts", "paths", "random:experts", "random:paths"}
    header = (out / "results.csv").read_text().splitlines()[0]
    for col in ("method", "targeted_group", "evaluated_group", "base_accuracy", "ablated_accuracy"):
        assert f'"{col}"' in header
    np.testing.assert_allclose(table["drop"], table["base_accuracy"] - table["ablated_accuracy"])


def test_base_and_ablated_accuracy_equal_direct_evaluations(run):
    model, tok, questions, out, table = run
    base = multiple_choice_accuracy(model, tok, questions, by=("domain",), progress=False).by_group()
    for g, acc in base.items():
        assert set(table["base_accuracy"][table["evaluated_group"] == g[0]]) == {acc}
    # One real ablation, re-run by hand from the saved seed-000 JSON.
    group = sorted(base)[0][0]
    targets = Targets.load(out / "targets" / f"{group}_experts.json", kind="experts")
    with intervene(model, targets):
        ablated = multiple_choice_accuracy(model, tok, questions, by=("domain",), progress=False).by_group()
    rows = (table["method"] == "experts") & (table["targeted_group"] == group)
    for evaluated, acc in zip(table["evaluated_group"][rows], table["ablated_accuracy"][rows]):
        assert acc == ablated[(evaluated,)]


def test_random_control_matches_the_targets_size_per_layer(run):
    _, _, _, out, _ = run
    counts = load_counts(out / "counts.zarr")
    group = {"domain": str(counts["domain"].values[0])}
    sel = metrics.specialized(counts, "experts", group, threshold=2.0)
    rand = random_like(sel, counts, "experts", seed=5)
    for layer in set(sel.layer.tolist()):
        assert len(rand.experts[layer]) == int(np.sum(sel.layer == layer))
        top1 = counts["experts"].sel(rank=0, layer=layer).sum("domain").values
        assert all(top1[e] > 0 for e in rand.experts[layer])


def test_summarize_by_hand():
    table = {
        "method": np.array(["paths"] * 4 + ["random:paths"] * 4),
        "targeted_group": np.array(["a", "a", "b", "b"] * 2),
        "evaluated_group": np.array(["a", "b", "a", "b"] * 2),
        "drop": np.array([0.4, 0.1, 0.0, 0.2, 0.1, 0.0, 0.0, 0.1]),
        "loss_increase": np.array([1.0, 0.2, np.nan, 0.6, 0.4, 0.1, 0.3, 0.0]),
    }
    s = summarize(table)["paths"]
    assert s["targeted_drop"] == pytest.approx((0.4 + 0.2) / 2)
    assert s["off_target_drop"] == pytest.approx((0.1 + 0.0) / 2)
    assert s["random_drop"] == pytest.approx((0.1 + 0.1) / 2)
    assert s["selectivity"] == pytest.approx(6.0)
    assert s["vs_random"] == pytest.approx(3.0)
    # loss: targeted (1.0 + 0.6) / 2, off-target 0.2 (group b's off-target row is NaN: left out)
    assert s["targeted_loss_increase"] == pytest.approx(0.8)
    assert s["off_target_loss_increase"] == pytest.approx(0.2)
    assert s["random_loss_increase"] == pytest.approx(0.2)
    assert s["loss_selectivity"] == pytest.approx(4.0)
    assert s["loss_vs_random"] == pytest.approx(4.0)


def test_every_effect_carries_a_paired_interval_and_p_value(run):
    """results.csv's new columns equal a paired test recomputed from items.csv by hand."""
    import json

    import pandas as pd
    import scipy.stats

    _, _, questions, out, table = run
    results = pd.read_csv(out / "results.csv")
    for col in ("n_questions", "drop_ci_low", "drop_ci_high", "drop_p_value"):
        assert col in results.columns
    ok = results["drop"].notna()
    assert (results.loc[ok, "drop_ci_low"] <= results.loc[ok, "drop"] + 1e-12).all()
    assert (results.loc[ok, "drop"] <= results.loc[ok, "drop_ci_high"] + 1e-12).all()
    assert results.loc[ok, "drop_p_value"].between(0, 1).all()
    n_per_group = pd.Series([q["domain"] for q in questions]).value_counts()
    assert (results["n_questions"] == results["evaluated_group"].map(n_per_group)).all()

    items = pd.read_csv(out / "items.csv")
    row = results[ok].iloc[0]
    cell = items[(items["kind"] == "question") & (items["method"] == row["method"])
                 & (items["targeted_group"] == row["targeted_group"])
                 & (items["evaluated_group"] == row["evaluated_group"]) & (items["seed"] == row["seed"])]
    assert len(cell) == row["n_questions"]
    assert cell["base"].mean() - cell["ablated"].mean() == pytest.approx(row["drop"])
    gained = int(((cell["base"] == 1) & (cell["ablated"] == 0)).sum())
    lost = int(((cell["base"] == 0) & (cell["ablated"] == 1)).sum())
    expected_p = 1.0 if gained + lost == 0 else scipy.stats.binomtest(gained, gained + lost, 0.5).pvalue
    assert row["drop_p_value"] == pytest.approx(expected_p)

    summary = json.loads((out / "summary.json").read_text())
    for method in ("experts", "paths"):
        iv = summary[method]["intervals"]["drop"]
        assert iv["targeted"]["estimate"] == pytest.approx(summary[method]["targeted_drop"])
        assert iv["random"]["estimate"] == pytest.approx(summary[method]["random_drop"])
        for key in ("targeted", "off_target", "random", "targeted_minus_random"):
            assert {"ci_low", "ci_high", "p_value"} <= set(iv[key])
        for key in ("selectivity", "vs_random"):
            value = summary[method][key]
            assert value is None or not np.isinf(value)  # undefined ratios are NaN, never inf
            assert iv[key]["defined"] == (value == value)


def test_summary_lines_show_intervals_and_never_inf(run):
    import json

    from engine.experiment import summary_lines

    _, _, _, out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("base_accuracy")
    lines = summary_lines(summary)
    assert len(lines) == 1 + 2  # header + one accuracy line per method (no texts in this run)
    assert all("inf" not in line for line in lines)
    assert all("[" in line for line in lines[1:])  # every effect with its interval


def test_dose_ladder_takes_the_most_specialized_items_first():
    from engine.experiment import dose_ladder, parse_doses

    sel = metrics.Selection(method="experts", group={"domain": "a"}, threshold=1.0, min_layer_index=0,
                            group_share=0.25, group_samples=10, all_samples=40,
                            layer=np.array([1, 1, 2, 3]), items=np.array([[4], [2], [7], [0]]),
                            n_samples=np.array([5, 9, 9, 1]), n_total=np.array([5, 10, 10, 1]),
                            prop=np.array([1.0, 0.9, 0.9, 1.0]))
    ladder = dose_ladder(sel, parse_doses("1,2,3,8,all"))
    assert [n for n, _ in ladder] == [1, 2, 3, 4]  # 8 > 4 items is dropped; "all" = 4
    # prop 1.0 first (more samples first: (1, 4) has 5, (3, 0) has 1), then prop 0.9 by count, layer
    firsts = [set(zip(s.layer.tolist(), s.items[:, 0].tolist())) for _, s in ladder]
    assert firsts[0] == {(1, 4)}
    assert firsts[1] == {(1, 4), (3, 0)}
    assert firsts[2] == {(1, 4), (3, 0), (1, 2)}
    with pytest.raises(Exception):
        parse_doses("0,1")
    with pytest.raises(Exception):
        parse_doses("1,1")


def test_dose_response_table(tmp_path):
    """dose_response.csv: every dose, mode, control, and the largest real dose equals the full
    ablation of results.csv (the same targets)."""
    import pandas as pd

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = tiny_model("olmoe", vocab_size=len(tok))
    questions = make_questions(n_per_group=2, seed=3)
    run_experiment(model, tok, questions, tmp_path, methods=("experts",), n_random=1,
                   thresholds={"experts": 1.5}, doses=[1, 2, "all"], modes=("reroute", "zero"), progress=False)
    dose = pd.read_csv(tmp_path / "dose_response.csv")
    for col in ("method", "mode", "targeted_group", "evaluated_group", "n_ablated", "is_random", "accuracy", "loss"):
        assert col in dose.columns
    # the requested step each row answers: "all" is each group's own n
    for targeted, rows in dose.groupby("targeted_group"):
        n_all = rows.loc[rows["dose"].astype(str) == "all", "n_ablated"]
        assert len(n_all) and (n_all == rows["n_ablated"].max()).all()
        numbered = rows[rows["dose"].astype(str) != "all"]
        assert (numbered["dose"].astype(int) == numbered["n_ablated"]).all()
    assert set(dose["mode"]) == {"reroute", "zero"}
    assert set(dose["is_random"]) == {True, False}
    results = pd.read_csv(tmp_path / "results.csv")
    for targeted, rows in dose[(dose["mode"] == "reroute") & ~dose["is_random"]].groupby("targeted_group"):
        full = rows[rows["n_ablated"] == rows["n_ablated"].max()]
        ref = results[(results["method"] == "experts") & (results["targeted_group"] == targeted)]
        merged = full.merge(ref, on="evaluated_group")
        np.testing.assert_allclose(merged["accuracy"], merged["ablated_accuracy"])
        n_items = int(ref["n_items"].iloc[0])
        assert rows["n_ablated"].max() == n_items


def test_report_shows_dose_response_and_intervals(tmp_path):
    """A run directory with dose_response.csv and items.csv: the report has the dose-response section
    (one curve figure per measure) and the per-method table carries intervals."""
    import re

    from engine.report import write_report

    torch.manual_seed(1)
    tok = build_tokenizer()
    model = tiny_model("olmoe", vocab_size=len(tok))
    questions = make_questions(n_per_group=2, seed=4)
    run_experiment(model, tok, questions, tmp_path, methods=("experts",), n_random=1,
                   thresholds={"experts": 1.5}, doses=[1, "all"], progress=False)
    html = write_report(tmp_path, tmp_path / "report.html").read_text()
    assert '<section id="dose-response">' in html
    dose_section = html.split('<section id="dose-response">', 1)[1].split("</section>", 1)[0]
    assert len(re.findall(r'<img alt="[^"]*" src="data:image/png;base64,', dose_section)) == 1  # accuracy only: no texts
    experiment = html.split('<section id="experiment">', 1)[1].split("</section>", 1)[0]
    assert "targeted - random" in experiment and re.search(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", experiment)


def _forward_counter(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_an_ablation_already_evaluated_is_not_evaluated_again(tmp_path):
    """The dose "all" is the main experiment's ablation and its random control the same draw: asking
    for it adds dose_response.csv rows but no forward pass."""
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = tiny_model("olmoe", vocab_size=len(tok))
    questions = make_questions(n_per_group=2, seed=3)
    passes = {}
    for name, doses in (("plain", None), ("all", ["all"])):
        calls, handle = _forward_counter(model)
        table = run_experiment(model, tok, questions, tmp_path / name, methods=("experts",), n_random=2,
                               thresholds={"experts": 1.5}, doses=doses, dose_random=1, progress=False)
        handle.remove()
        passes[name] = len(calls)
    assert passes["all"] == passes["plain"] > 0
    import pandas as pd

    dose = pd.read_csv(tmp_path / "all" / "dose_response.csv")
    assert set(dose.loc[dose["is_random"], "seed"]) == {0}  # dose_random=1: one control draw per step
    evaluated = np.asarray(table["ablated_accuracy"], dtype=float)
    assert np.isfinite(evaluated).all()


def test_top1_model_runs_without_pairs_and_refuses_them(tmp_path):
    """A top-1 model has no expert pairs: the experiment runs its other methods (and leaves the pairs
    statistic out of counts.zarr); asking for pairs is a clear error, not a crash in the counter."""
    from engine.errors import MoetraceError

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = tiny_model("olmoe", vocab_size=len(tok), num_experts_per_tok=1)
    questions = make_questions(n_per_group=2, seed=5)
    table = run_experiment(model, tok, questions, tmp_path / "ok", methods=("experts", "paths"), n_random=1,
                           thresholds={"experts": 1.5}, progress=False)
    assert {"experts", "paths"} <= set(table["method"].tolist())
    counts = load_counts(tmp_path / "ok" / "counts.zarr")
    assert "experts" in counts and "pairs" not in counts
    with pytest.raises(MoetraceError, match="methods: pairs needs a model with top_k >= 2"):
        run_experiment(model, tok, questions, tmp_path / "bad", methods=("experts", "pairs"), n_random=1,
                       progress=False)
