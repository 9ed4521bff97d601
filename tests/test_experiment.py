"""The ablation experiment runner on a tiny random model, and its summary arithmetic."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from moetrace import metrics
from moetrace.counting import coverage, load_counts
from moetrace.demo.data import build_tokenizer, make_questions, make_texts
from moetrace.errors import MoetraceError
from moetrace.evaluate import multiple_choice_accuracy
from moetrace.experiment import COVERAGE_BAND, RouteTable, matched_random, run_experiment
from moetrace.results import summarize
from moetrace.intervene import intervene
from moetrace.significance import holm
from moetrace.store import TraceStore
from moetrace.targets import Targets
from tiny_models import tiny_model

N_RANDOM = 3


def _data(seed: int, n: int = 3):
    questions = make_questions(n_per_group=n, seed=seed)
    texts = make_texts(2, seed=seed, statements_per_text=2)
    select = make_texts(4, seed=seed, statements_per_text=2, stream="select", exclude=texts)
    return questions, texts, select


def _tiny(seed: int = 0, **config):
    """(a tiny random OLMoE over the demo vocabulary, the demo tokenizer)."""
    torch.manual_seed(seed)
    tok = build_tokenizer()
    return tiny_model("olmoe", vocab_size=len(tok), **config), tok


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model, tok = _tiny()
    questions, texts, select = _data(1)
    out = tmp_path_factory.mktemp("exp")
    table = run_experiment(model, tok, questions, out, texts=texts, select_texts=select, methods=("experts", "paths"),
                           n_random=N_RANDOM, thresholds={"experts": 1.5, "paths": 2.0}, progress=False)
    return model, tok, questions, texts, select, out, table


def test_table_has_a_row_per_target_and_evaluated_group_and_per_draw(run):
    model, tok, questions, texts, select, out, table = run
    groups = sorted({q["domain"] for q in questions})
    method = table["method"]
    real = np.isin(method, ["experts", "paths"])
    with_items = real & (table["n_items"] > 0)
    # every targeted ablation is evaluated on every group; each draw on its targeted group only
    targeted_with_items = {(m, t) for m, t in zip(method[with_items], table["targeted_group"][with_items])}
    assert with_items.sum() == len(targeted_with_items) * len(groups)
    draws = ~real
    assert (table["targeted_group"][draws] == table["evaluated_group"][draws]).all()
    for m, t in targeted_with_items:
        seeds = table["seed"][(method == f"random:{m}") & (table["targeted_group"] == t)]
        assert sorted(seeds.tolist()) == list(range(len(seeds))) and 1 <= len(seeds) <= N_RANDOM
    assert set(table["scoring"]) == {"answer"}
    header = (out / "results.csv").read_text().splitlines()[0]
    for col in ("method", "targeted_group", "evaluated_group", "base_accuracy", "ablated_accuracy", "in_band",
                "target_coverage", "answer_loss_increase", "other_loss_increase", "drop_p_holm", "scoring"):
        assert f'"{col}"' in header
    ok = ~np.isnan(table["drop"].astype(float))
    np.testing.assert_allclose(table["drop"][ok], (table["base_accuracy"] - table["ablated_accuracy"])[ok])


def test_base_and_ablated_accuracy_equal_direct_evaluations(run):
    model, tok, questions, texts, select, out, table = run
    base = multiple_choice_accuracy(model, tok, questions, by=("domain",), progress=False).by_group()
    for g, acc in base.items():
        assert set(table["base_accuracy"][table["evaluated_group"] == g[0]]) == {acc}
    rows = (table["method"] == "experts") & (table["n_items"] > 0)
    group = table["targeted_group"][rows][0]
    targets = Targets.load(out / "targets" / f"{group}_experts.json", kind="experts")
    with intervene(model, targets):
        ablated = multiple_choice_accuracy(model, tok, questions, by=("domain",), progress=False).by_group()
    rows &= table["targeted_group"] == group
    for evaluated, acc in zip(table["evaluated_group"][rows], table["ablated_accuracy"][rows]):
        assert acc == ablated[(evaluated,)]


def test_targets_come_from_the_held_out_texts(run):
    """trace.zarr holds the routing of the selection texts (one sequence each), not of the evaluated
    items; the summary says so; a selection text that is also evaluated is refused."""
    model, tok, questions, texts, select, out, _ = run
    store = TraceStore.open(out / "trace.zarr")
    assert store.info()["sequences"] == len(select)
    lengths = [len(tok(t["text"])["input_ids"]) for t in select]
    assert len(store) == sum(lengths)
    assert "held-out" in json.loads((out / "summary.json").read_text())["selection"]
    with pytest.raises(MoetraceError, match="select_texts: text 0 is also an evaluated item"):
        run_experiment(model, tok, questions, out / "bad", texts=texts, select_texts=[texts[0]], n_random=1,
                       methods=("experts",), progress=False)


def test_without_held_out_texts_the_experiment_warns(tmp_path):
    model, tok = _tiny()
    questions, _, _ = _data(2, n=2)
    with pytest.warns(UserWarning, match="select_texts not given"):
        run_experiment(model, tok, questions, tmp_path, methods=("experts",), n_random=1,
                       thresholds={"experts": 1.5}, progress=False)
    assert "not held out" in json.loads((tmp_path / "summary.json").read_text())["selection"]


@pytest.mark.parametrize("method", ["experts", "paths"])
def test_route_table_coverage_equals_the_store_pass(run, method):
    """RouteTable.coverage_of (from counts.zarr) equals moetrace.counting.coverage over trace.zarr."""
    _, _, _, _, _, out, _ = run
    counts = load_counts(out / "counts.zarr")
    routes = RouteTable(counts, method)
    for group in routes.groups:
        sel = metrics.specialized(counts, method, {"domain": group}, threshold=1.0)
        if not len(sel):
            continue
        cov = coverage(out / "trace.zarr", Targets.from_specialized(method, sel), by=["domain"], kind=method,
                       skip_shared_prefix=True, progress=False)
        for other in routes.groups:
            assert routes.coverage_of(other, sel.layer, sel.items) == pytest.approx(
                float(cov["prop_targeted"].sel(domain=other)), rel=1e-12)


def test_matched_draws_exclude_every_groups_targets_and_match_coverage(run):
    _, _, _, _, _, out, _ = run
    counts = load_counts(out / "counts.zarr")
    routes = RouteTable(counts, "experts")
    selections = {g: metrics.specialized(counts, "experts", {"domain": g}, threshold=1.5) for g in routes.groups}
    exclude = {(int(layer), int(item[0])) for s in selections.values() for layer, item in zip(s.layer, s.items)}
    group = next(g for g, s in selections.items() if len(s))
    sel = selections[group]
    target_cov = routes.coverage_of(group, sel.layer, sel.items)
    draws = matched_random(sel, routes, group, exclude, 30, [0], band=COVERAGE_BAND)
    assert 1 <= len(draws) <= 30
    # distinct sets of routes
    assert len({json.dumps(d.targets.to_dict(), sort_keys=True) for d in draws}) == len(draws)
    top1 = counts["experts"].sel(rank=0).sum("domain")
    for d in draws:
        for layer, experts in d.targets.experts.items():
            available = sum(1 for e in range(counts.sizes["expert"])
                            if float(top1.sel(layer=layer, expert=e)) > 0 and (layer, e) not in exclude)
            assert len(experts) == min(int(np.sum(sel.layer == layer)), available)
            assert not {(layer, e) for e in experts} & exclude
            assert all(float(top1.sel(layer=layer, expert=e)) > 0 for e in experts)  # real routes only
        layer_ids = np.concatenate([[l] * len(v) for l, v in d.targets.experts.items()]).astype(np.int64)
        items = np.concatenate([sorted(v) for v in d.targets.experts.values()]).reshape(-1, 1)
        assert d.coverage == pytest.approx(routes.coverage_of(group, layer_ids, items))
        inside = target_cov / COVERAGE_BAND - 1e-12 <= d.coverage <= target_cov * COVERAGE_BAND + 1e-12
        assert d.in_band == inside
    # in-band draws come first; out-of-band ones only when too few are in band
    flags = [d.in_band for d in draws]
    assert flags == sorted(flags, reverse=True)


def test_summary_tests_are_recomputed_from_items_csv(run):
    """summary.json's draw test per group equals the rank formula on items.csv by hand; every
    targeted_minus_random carries n_random; the primary tests' Holm values are holm() of theirs."""
    _, _, _, _, _, out, _ = run
    summary = json.loads((out / "summary.json").read_text())
    items = pd.read_csv(out / "items.csv", dtype={"method": str, "targeted_group": str, "evaluated_group": str})
    for method in ("experts", "paths"):
        for measure, entry in summary[method].items():
            assert "n_random" in entry["targeted_minus_random"]
            kind = {"drop": "question", "loss_increase": "text", "answer_loss_increase": "text_answer",
                    "other_loss_increase": "text_other"}[measure]
            for group, test in entry["per_group"].items():
                n_draws = len(set(table_seeds(out, method, group)))
                sub = items[(items["kind"] == kind) & (items["targeted_group"] == group)
                            & (items["evaluated_group"] == group)]
                sign = 1 if kind == "question" else -1
                w = sub[sub["method"] == method]["weight"].to_numpy()

                def effect(frame):
                    return float(np.sum(sign * (frame["base"] - frame["ablated"]).to_numpy() * w) / w.sum())

                t = effect(sub[sub["method"] == method].sort_values("item"))
                r = [effect(d.sort_values("item")) for _, d in sub[sub["method"] == f"random:{method}"].groupby("seed")]
                assert test["n_random"] == len(r) == n_draws
                assert test["p_value"] == pytest.approx((1 + sum(x >= t - 1e-12 for x in r)) / (len(r) + 1))
                assert test["estimate"] == pytest.approx(t - np.mean(r))
    primary = summary["primary_tests"]
    assert {(p["method"], p["measure"]) for p in primary} <= {(m, x) for m in ("experts", "paths")
                                                               for x in ("drop", "loss_increase")}
    np.testing.assert_allclose([p["p_holm"] for p in primary], holm([p["p_value"] for p in primary]))


def table_seeds(out, method, group) -> list[int]:
    results = pd.read_csv(out / "results.csv", dtype={"method": str, "targeted_group": str})
    return results[(results["method"] == f"random:{method}") & (results["targeted_group"] == group)]["seed"].tolist()


def test_results_intervals_equal_a_paired_test_recomputed_from_items(run):
    import scipy.stats

    _, _, questions, _, _, out, _ = run
    results = pd.read_csv(out / "results.csv", dtype={"method": str, "targeted_group": str, "evaluated_group": str})
    ok = results["drop_p_value"].notna()
    assert ok.any()
    assert (results.loc[ok, "drop_ci_low"] <= results.loc[ok, "drop"] + 1e-12).all()
    assert (results.loc[ok, "drop"] <= results.loc[ok, "drop_ci_high"] + 1e-12).all()
    np.testing.assert_allclose(results["drop_p_holm"], holm(results["drop_p_value"]))
    n_per_group = pd.Series([q["domain"] for q in questions]).value_counts()
    assert (results["n_questions"] == results["evaluated_group"].map(n_per_group)).all()
    items = pd.read_csv(out / "items.csv", dtype={"method": str, "targeted_group": str, "evaluated_group": str})
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


def test_a_group_at_chance_is_not_testable_on_accuracy(run):
    """The random tiny model answers at about chance: base.csv marks every group not testable, and
    the accuracy headline averages over none of them (n/a, never an effect of 0)."""
    from moetrace.results import summary_lines

    _, _, _, _, _, out, _ = run
    base = pd.read_csv(out / "base.csv", dtype={"group": str})
    assert set(base.columns) >= {"base_accuracy", "chance", "blind_accuracy", "testable", "base_ci_low"}
    assert (base["chance"] == 0.25).all()
    assert not base["testable"].any()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experts"]["drop"]["groups"] == []
    assert sorted(summary["experts"]["drop"]["not_testable"]) == sorted(base["group"])
    lines = summary_lines(summary)
    assert any(line.startswith("experts  accuracy drop") and "n/a" in line for line in lines)
    assert "not testable on accuracy" in lines[-1]
    assert all("inf" not in line for line in lines)


def test_testable_needs_the_interval_above_chance_and_the_blind_baseline():
    from moetrace.experiment import _base_rows

    ones = np.ones(200)
    base = {"question": {"a": (np.arange(200), np.r_[np.ones(80), np.zeros(120)], ones),  # 0.40
                         "b": (np.arange(200), np.r_[np.ones(160), np.zeros(40)], ones),  # 0.80
                         "c": (np.arange(200), np.r_[np.ones(58), np.zeros(142)], ones)}}  # 0.29: CI holds 0.25
    blind = {"a": np.r_[np.ones(90), np.zeros(110)].astype(bool),  # blind 0.45 > base: not testable
             "b": np.zeros(200, dtype=bool), "c": np.zeros(200, dtype=bool)}
    rows = {r["group"]: r for r in _base_rows(base, blind, "answer")}
    assert [rows[g]["testable"] for g in "abc"] == [False, True, False]
    assert rows["b"]["base_ci_low"] == pytest.approx(0.7378, abs=1e-3)  # Clopper-Pearson, 160/200


def test_summarize_by_hand():
    table = {
        "method": np.array(["paths"] * 4 + ["random:paths"] * 4),
        "targeted_group": np.array(["a", "a", "b", "b", "a", "a", "b", "b"]),
        "evaluated_group": np.array(["a", "b", "a", "b", "a", "a", "b", "b"]),
        "seed": np.array([-1, -1, -1, -1, 0, 1, 0, 1]),
        "drop": np.array([0.4, 0.1, 0.0, 0.2, 0.1, 0.0, 0.0, 0.1]),
        "loss_increase": np.array([1.0, 0.2, np.nan, 0.6, 0.4, 0.1, 0.3, 0.0]),
    }
    s = summarize(table)["paths"]
    assert s["drop"]["targeted"]["estimate"] == pytest.approx((0.4 + 0.2) / 2)
    assert s["drop"]["off_target"]["estimate"] == pytest.approx((0.1 + 0.0) / 2)
    assert s["drop"]["random"]["estimate"] == pytest.approx((0.05 + 0.05) / 2)
    assert s["drop"]["selectivity"]["estimate"] == pytest.approx(6.0)
    assert s["drop"]["targeted_minus_random"] == {"estimate": pytest.approx(0.25), "n_random": 2}
    # loss: targeted (1.0 + 0.6) / 2, off-target 0.2 (group b's off-target row is NaN: left out)
    assert s["loss_increase"]["targeted"]["estimate"] == pytest.approx(0.8)
    assert s["loss_increase"]["off_target"]["estimate"] == pytest.approx(0.2)
    assert s["loss_increase"]["random"]["estimate"] == pytest.approx((0.25 + 0.15) / 2)
    # accuracy of an untestable group is left out
    only_b = summarize(table, testable={"b"})["paths"]["drop"]
    assert only_b["groups"] == ["b"] and only_b["not_testable"] == ["a"]
    assert only_b["targeted"]["estimate"] == pytest.approx(0.2)


def test_nothing_to_ablate_is_reported_as_no_targets_not_as_zero(tmp_path):
    model, tok = _tiny()
    questions, texts, select = _data(3, n=2)
    with pytest.warns(UserWarning, match="nothing to ablate, no effect reported"):
        table = run_experiment(model, tok, questions, tmp_path, select_texts=select, methods=("experts",),
                               n_random=1, thresholds={"experts": 5.0}, progress=False)
    assert (table["n_items"] == 0).all()
    assert np.isnan(table["drop"].astype(float)).all()
    assert "random:experts" not in set(table["method"])
    # the headline says so: no effect printed as +0.000, a line naming the groups without targets
    from moetrace.results import summary_lines

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["experts"]["drop"]["no_targets"] == sorted(set(table["targeted_group"]))
    lines = summary_lines(summary)
    row = next(line for line in lines if line.startswith("experts "))
    assert "+0.000" not in row and "n/a" in row
    assert any("experts: no item reached the selection threshold for any group: nothing was ablated" in line
               for line in lines)


def test_dose_ladder_takes_the_most_specialized_items_first():
    from moetrace.experiment import dose_ladder, parse_doses

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
    """dose_response.csv: every dose and mode, the targets' coverage of the targeted group (the x axis),
    matched draws evaluated on the targeted group, and the largest real dose equals the full ablation."""
    model, tok = _tiny()
    questions, texts, select = _data(3, n=2)
    run_experiment(model, tok, questions, tmp_path, select_texts=select, methods=("experts",), n_random=2,
                   thresholds={"experts": 1.5}, doses=[1, 2, "all"], modes=("reroute", "zero"), dose_random=2,
                   progress=False)
    dose = pd.read_csv(tmp_path / "dose_response.csv", dtype={"dose": str, "targeted_group": str,
                                                               "evaluated_group": str})
    for col in ("target_coverage", "in_band", "coverage", "accuracy", "loss"):
        assert col in dose.columns
    for targeted, rows in dose.groupby("targeted_group"):
        n_all = rows.loc[rows["dose"] == "all", "n_ablated"]
        assert len(n_all) and (n_all == rows["n_ablated"].max()).all()
        numbered = rows[rows["dose"] != "all"]
        assert (numbered["dose"].astype(int) == numbered["n_ablated"]).all()
        own = rows[~rows["is_random"] & (rows["evaluated_group"] == targeted)]
        assert (own["coverage"] == own["target_coverage"]).all()
    randoms = dose[dose["is_random"]]
    assert (randoms["targeted_group"] == randoms["evaluated_group"]).all()
    assert set(dose["mode"]) == {"reroute", "zero"}
    results = pd.read_csv(tmp_path / "results.csv", dtype={"targeted_group": str, "evaluated_group": str})
    for targeted, rows in dose[(dose["mode"] == "reroute") & ~dose["is_random"]].groupby("targeted_group"):
        full = rows[rows["n_ablated"] == rows["n_ablated"].max()]
        ref = results[(results["method"] == "experts") & (results["targeted_group"] == targeted)]
        merged = full.merge(ref, on="evaluated_group")
        np.testing.assert_allclose(merged["accuracy"], merged["ablated_accuracy"])


def test_report_shows_dose_response_and_intervals(tmp_path):
    import re

    from moetrace.report import write_report

    model, tok = _tiny(1)
    questions, texts, select = _data(4, n=2)
    run_experiment(model, tok, questions, tmp_path, texts=texts, select_texts=select, methods=("experts",),
                   n_random=2, thresholds={"experts": 1.5}, doses=[1, "all"], progress=False)
    html = write_report(tmp_path, tmp_path / "report.html").read_text()
    assert '<section id="dose-response">' in html
    experiment = html.split('<section id="experiment">', 1)[1].split("</section>", 1)[0]
    assert "targeted - random" in experiment and re.search(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]", experiment)
    assert "not testable" in experiment and "answer-blind" in experiment
    targets = html.split('<section id="targets">', 1)[1].split("</section>", 1)[0]
    assert "random draws" in targets


def _forward_counter(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


def test_an_ablation_already_evaluated_is_not_evaluated_again(tmp_path):
    """The dose "all" is the main experiment's ablation and its draws the main draws: asking for it
    adds dose_response.csv rows but no forward pass."""
    model, tok = _tiny()
    questions, texts, select = _data(3, n=2)
    passes = {}
    for name, doses in (("plain", None), ("all", ["all"])):
        calls, handle = _forward_counter(model)
        run_experiment(model, tok, questions, tmp_path / name, select_texts=select, methods=("experts",), n_random=2,
                       thresholds={"experts": 1.5}, doses=doses, dose_random=1, progress=False)
        handle.remove()
        passes[name] = len(calls)
    assert passes["all"] == passes["plain"] > 0
    dose = pd.read_csv(tmp_path / "all" / "dose_response.csv")
    assert set(dose.loc[dose["is_random"], "seed"]) == {0}  # dose_random=1: one draw per step


def test_top1_model_runs_without_pairs_and_refuses_them(tmp_path):
    model, tok = _tiny(num_experts_per_tok=1)
    questions, texts, select = _data(5, n=2)
    table = run_experiment(model, tok, questions, tmp_path / "ok", select_texts=select, methods=("experts", "paths"),
                           n_random=1, thresholds={"experts": 1.5}, progress=False)
    assert {"experts", "paths"} <= set(table["method"].tolist())
    counts = load_counts(tmp_path / "ok" / "counts.zarr")
    assert "experts" in counts and "pairs" not in counts
    with pytest.raises(MoetraceError, match="methods: pairs needs a model with top_k >= 2"):
        run_experiment(model, tok, questions, tmp_path / "bad", select_texts=select, methods=("experts", "pairs"),
                       n_random=1, progress=False)
