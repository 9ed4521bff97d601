"""Seed 000's whole notebook through the command line: CSV -> store -> counts -> targets JSON.

The oracle is tests/seed000_oracle.py, a pandas transcription of the R code, run on the very
same CSV files (read back with pandas, whitespace kept, as fread(strip.white = F) does).
"""

import json

import pandas as pd
import pytest

import seed000_oracle as oracle
from moetrace.cli import main
from moetrace import metrics
from test_metrics import DOMAINS, LANGS, seed000_frames


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seed000")
    samples, topks, _ = seed000_frames(21, n_questions=40)
    samples.to_csv(tmp / "samples.csv", index=False)
    topks.to_csv(tmp / "topks.csv", index=False)
    assert main(["import-csv", "--samples", str(tmp / "samples.csv"), "--topks", str(tmp / "topks.csv"),
                 str(tmp / "trace.zarr"), "-q"]) == 0
    assert main(["count", str(tmp / "trace.zarr"), str(tmp / "counts.zarr"), "--stats", "experts,paths,pairs",
                 "--by", "domain,lang", "--skip-shared-prefix", "--quiet"]) == 0
    raw_samples = pd.read_csv(tmp / "samples.csv", keep_default_na=False, dtype={"token": str})
    raw_topks = pd.read_csv(tmp / "topks.csv")
    return tmp, oracle.load(raw_samples, raw_topks)


@pytest.mark.parametrize("method", ["paths", "experts", "pairs"])
def test_specialize_cli_writes_the_notebooks_targets(pipeline, method):
    tmp, data = pipeline
    oracle_fn = {"paths": oracle.spec_paths, "experts": oracle.spec_experts, "pairs": oracle.spec_multi_topk}[method]
    threshold = metrics.SPECIALIZATION_METHODS[method][3]
    for domain in DOMAINS:
        for lang in LANGS:
            out = tmp / f"{domain}_{lang}_{method}.json"
            assert main(["specialize", str(tmp / "counts.zarr"), "--method", method,
                         "--group", f"domain={domain},lang={lang}", "--out", str(out), "--quiet"]) == 0
            spec, _, _ = oracle_fn(data, domain, lang, threshold)
            got = json.loads(out.read_text())
            if method == "paths":
                assert out.read_text().strip() == oracle.exportable_json(spec).strip()
            want = {}
            for row in spec.itertuples(index=False):
                item = {"paths": lambda r: [r.prev_expert, r.expert], "experts": lambda r: r.expert,
                        "pairs": lambda r: [r.first, r.second]}[method](row)
                want.setdefault(str(row.layer_ix), []).append(item)
            assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in want.items()}


def test_base_accuracy_matches_the_notebook(pipeline):
    from moetrace.counting import sequence_table
    from moetrace.store import TraceStore

    tmp, data = pipeline
    store = TraceStore.open(tmp / "trace.zarr")
    seqs = sequence_table(store, ["domain", "lang"], skip_shared_prefix=True)
    got = metrics.base_accuracy(seqs, ["domain", "lang"])
    want = oracle.base_accs(data["sample_df"]).sort_values(["domain", "lang"])
    assert got["domain"].tolist() == want["domain"].tolist()
    assert got["base_acc"].tolist() == pytest.approx(want["base_acc"].tolist())
    assert got["total_tokens"].tolist() == want["total_tokens"].tolist()
