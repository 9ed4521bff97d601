"""The trace half of `moetrace demo`, end to end on a small built-in trace."""

import json

import numpy as np

from moetrace.counting import sequence_table
from moetrace.demo.trace import run_trace_demo
from moetrace.store import TraceStore
from moetrace.synthetic import TraceSpec
from moetrace.targets import Targets


def test_trace_demo_writes_every_artifact(tmp_path):
    spec = TraceSpec(n_tokens=64 * 24, n_layers=4, n_experts=16, top_k=2, seq_len=24, seed=3)
    summary = run_trace_demo(tmp_path, spec, progress=False)
    assert summary["rows"] == 64 * 24 and summary["parquet_round_trip_equal"]
    assert json.loads((tmp_path / "trace_summary.json").read_text()) == summary
    paths = Targets.load(tmp_path / "targets" / "math_en_paths.json", kind="paths")
    assert paths.paths and min(paths.paths) >= 1  # seed 000: no paths into the first layer
    # The planted specialization: each group's own targets cover its routes far more than others'.
    for row in summary["targets"]:
        if row["method"] == "paths":
            assert float(row["own_coverage"]) > 3 * float(row["others_coverage"])


def test_sequence_table_joins_labels_and_kept_tokens(tmp_path):
    spec = TraceSpec(n_tokens=10 * 8, n_layers=2, n_experts=4, top_k=1, seq_len=8, seed=1)
    from moetrace.synthetic import generate_chunk

    batch = generate_chunk(spec, 0, spec.n_tokens)
    batch["token_id"] = np.where(batch["pos"] < 3, 7, batch["token_id"])  # shared 3-token prefix
    with TraceStore.create(tmp_path / "t.zarr", n_layers=2, n_experts=4, top_k=1, labels=["domain", "lang"],
                           chunk_rows=16) as st:
        batch.pop("weights")
        st.append(batch)
    table = sequence_table(tmp_path / "t.zarr", ["domain", "lang"], skip_shared_prefix=True)
    assert table["seq"].tolist() == list(range(10))
    first = np.arange(10) * 8
    assert table["domain"].tolist() == batch["domain"][first].tolist()
    assert table["lang"].tolist() == batch["lang"][first].tolist()
    assert table["n_tokens"].tolist() == [5] * 10
    assert sequence_table(tmp_path / "t.zarr")["n_tokens"].tolist() == [8] * 10


def test_sequence_table_joins_metadata_on_seq_whatever_its_order(tmp_path):
    with TraceStore.create(tmp_path / "t.zarr", n_layers=1, n_experts=2, top_k=1, labels=["domain"]) as st:
        st.append({"seq": [5, 5, 7, 9], "pos": [0, 1, 0, 0], "experts": np.zeros((4, 1, 1), int),
                   "domain": ["a", "a", "b", "a"]})
        st.append_sequences({"seq": [9, 5, 7], "answer_char": ["C", "A", "B"]})
    table = sequence_table(tmp_path / "t.zarr", ["domain"])
    assert table["seq"].tolist() == [5, 7, 9]
    assert table["answer_char"].tolist() == ["A", "B", "C"]
    assert table["n_tokens"].tolist() == [2, 1, 1]
