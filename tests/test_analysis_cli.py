"""The analysis commands end to end on a tiny saved checkpoint and a captured store: each writes
its numbers and its PNG + PDF figure, the numbers equal the library functions' results, and
``moetrace report`` then shows a section for each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from moetrace.analysis import decisiveness, expert_profile, load_result
from moetrace.capture import capture
from moetrace.cli import main as cli_main
from moetrace.report import write_report
from tiny_models import VOCAB, tiny_model

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_model("olmoe")
    model.save_pretrained(root / "ckpt")
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(3, VOCAB, size=int(n)).tolist(), "domain": d, "lang": g}
            for n, d, g in zip(rng.integers(6, 14, 24), ["bio", "code", "math"] * 8, ["de", "en"] * 12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = root / "run"
    with capture(model, run / "trace.zarr", labels=["domain", "lang"], probs=True) as cap, torch.no_grad():
        for i, r in enumerate(rows):
            cap.set_batch(seq=[i], labels={"domain": [r["domain"]], "lang": [r["lang"]]})
            model(input_ids=torch.tensor([r["input_ids"]]))
    return root, run, model, rows


def files(out, name):
    assert (out / f"{name}.png").read_bytes()[:8] == PNG
    assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"


def test_store_commands(setup, capsys):
    root, run, model, rows = setup
    out = run / "analysis"
    store = str(run / "trace.zarr")
    assert cli_main(["decisiveness", store, "--layers", "0", "2", "--num-tokens", "150", "--out", str(out)]) == 0
    files(out, "decisiveness")
    got = load_result(out / "decisiveness.zarr")
    want = decisiveness(store, layers=[0, 2], num_tokens=150, by=["domain", "lang"], bins=200)
    np.testing.assert_allclose(got["mean_entropy"], want["mean_entropy"])
    csv = pd.read_csv(out / "decisiveness.csv")
    assert set(csv["layer"]) == {0, 2} and len(csv) == 2 * 6
    assert cli_main(["router-metrics", store, "--by", "domain", "--layers", "1", "--out", str(out)]) == 0
    files(out, "router_metrics_layer1")
    assert set(pd.read_csv(out / "router_metrics.csv")["group"]) == {"bio", "code", "math"}
    assert cli_main(["lang-domain", store, "--out", str(out)]) == 0
    files(out, "lang_domain")
    assert {"by_domain", "by_lang"} <= set(pd.read_csv(out / "lang_domain.csv").columns)
    assert cli_main(["profile", store, "--layers", "1", "--expert", "3", "--out", str(out)]) == 0
    prof = json.loads((out / "profile_layer1_expert3.json").read_text())
    assert prof == json.loads(json.dumps(expert_profile(store, 1, 3)))
    capsys.readouterr()
    assert cli_main(["decisiveness", store, "--layers", "7", "--out", str(out)]) == 2
    assert "layer 7 is not a recorded MoE layer" in capsys.readouterr().err


def test_model_commands_and_report(setup, capsys):
    root, run, model, rows = setup
    out = run / "analysis"
    common = ["--model", str(root / "ckpt"), "--data", str(root / "data.jsonl"), "--labels", "domain,lang",
              "--num-tokens", "80", "--out", str(out)]
    other = root / "from_model"
    assert cli_main(["decisiveness", "--model", str(root / "ckpt"), "--data", str(root / "data.jsonl"),
                     "--labels", "domain", "--num-tokens", "40", "--batch-size", "3", "--out", str(other)]) == 0
    direct = load_result(other / "decisiveness.zarr")
    assert direct["tokens"].sum() == 40 and set(direct["group"].values) == {"bio", "code", "math"}
    assert cli_main(["router-stats", *common, "--layers", "1"]) == 0
    files(out, "router_stats")
    assert cli_main(["similarity", *common, "--layers", "0", "--experts", "0", "1", "2", "5"]) == 0
    files(out, "similarity_layer0")
    sim = load_result(out / "similarity.zarr")
    assert sim["cka"].shape == (1, 4, 4) and sim.attrs["tokens"] == 80
    np.testing.assert_allclose(np.diag(sim["cka"].values[0]), 1.0)
    assert cli_main(["dim-reduc", *common, "--layers", "2", "--method", "pca"]) == 0
    files(out, "dim_reduc_layer2")
    pts = pd.read_csv(out / "dim_reduc_layer2.csv")
    assert len(pts) == 80 * 2 and set(pts["group"]) == {f"{d}/{g}" for d in ("bio", "code", "math")
                                                        for g in ("de", "en")}
    assert cli_main(["steer", "--model", str(root / "ckpt"), "--prompt-ids", *map(str, rows[0]["input_ids"]),
                     "--layers", "1", "--expert", "2", "--scale", "0", "--target-idx", "3",
                     "--max-new-tokens", "3", "--out", str(out)]) == 0
    assert "before:" in capsys.readouterr().out
    files(out, "steer_layers1_expert2_scale0_logit0")
    assert cli_main(["steer", "--model", str(root / "ckpt"), "--prompt-ids", *map(str, rows[0]["input_ids"]),
                     "--layers", "1", "--expert", "2", "--scale", "2.5", "--max-new-tokens", "3", "--out", str(out)]) == 0
    files(out, "steer_layers1_expert2_scale2.5_logit0")  # a boost beside the ablation, not over it
    files(out, "steer_layers1_expert2_scale0_logit0")
    assert cli_main(["profile", str(run / "trace.zarr"), "--layers", "0", "--expert", "1", "--out", str(out)]) == 0
    text = write_report(run, root / "report.html").read_text()
    for sec in ("decisiveness", "router-metrics", "lang-domain", "router-stats", "similarity", "embedding",
                "profiles", "steering", "pairs", "coactivation"):
        assert f'<section id="{sec}">' in text and f'href="#{sec}"' in text


def test_run_suite_writes_every_model_analysis(setup, tmp_path):
    from moetrace.analysis.suite import run_suite
    from moetrace.store import TraceStore

    root, run, model, rows = setup
    out = tmp_path / "analysis"
    run_suite(model, [r["input_ids"] for r in rows], [r["domain"] for r in rows], out, num_tokens=60,
              batch_size=5, method="pca")  # UMAP's numba compile (~30 s) is the slow test's in test_analysis_models
    st = TraceStore.open(out / "probs.zarr")
    assert len(st) == 60 and st.has_probs and set(st.labels["group"]) == {"bio", "code", "math"}
    for name in ("decisiveness", "router_stats", "similarity_layer0", "dim_reduc_layer0"):
        files(out, name)
    assert load_result(out / "decisiveness.zarr")["tokens"].sum() == 60
    assert len(list(out.glob("profile_layer0_expert*.json"))) == 1
    assert len(list(out.glob("steer_layers0_expert*_scale*_logit*.json"))) == 1


def test_every_declared_analysis_is_complete(tmp_path, monkeypatch, capsys):
    """Each ``ANALYSIS`` of engine/analysis/ declares a command whose example runs verbatim from a directory
    holding ``run/trace.zarr`` (the demo model, captured with --probs and labels domain, lang), writes every
    output it declares, shows its figures in ``moetrace.figures`` and gets its section in the report."""
    import shlex

    from moetrace import figures
    from moetrace.analysis import ANALYSES
    from moetrace.demo.data import make_training_documents
    from moetrace.report import SECTIONS

    monkeypatch.chdir(tmp_path)
    docs = make_training_documents(120, seed=3)
    Path("data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    assert cli_main(["capture", "run/trace.zarr", "--model", "demo", "--data", "data.jsonl", "--labels", "domain,lang",
                     "--probs", "--quiet"]) == 0
    modules = {p.stem for p in (Path(__file__).resolve().parents[1] / "engine" / "analysis").glob("[!_]*.py")}
    assert len(ANALYSES) == len(modules - {"suite"})  # every public module declares one (the import checks the type)
    assert len({a.command for a in ANALYSES}) == len(ANALYSES)
    section_ids = [s.id for s in SECTIONS]
    for analysis in ANALYSES:
        args = shlex.split(analysis.example)
        assert args[0] == analysis.command and "--out" in args and args[args.index("--out") + 1] == "run/analysis"
        assert cli_main(args) == 0, analysis.example
        for pattern in analysis.outputs:
            assert list(Path("run/analysis").glob(pattern)), f"{analysis.command}: wrote no {pattern}"
        for name, fn in analysis.figures.items():
            assert getattr(figures, name) is fn
        if analysis.section is not None:
            assert analysis.section.id in section_ids
    capsys.readouterr()
    page = write_report(Path("run"), Path("report.html")).read_text()
    for analysis in ANALYSES:
        if analysis.section is not None:
            assert f'<section id="{analysis.section.id}">' in page, analysis.command
