"""import-llamacpp (seed 002's DIR/<domain>/traces/token-NNNNN.json): contract, properties, errors."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_contract import CHUNK, ImporterContract, RefTrace, assert_store_equals_trace

from moetrace.cli import main
from moetrace.errors import MoetraceError
from moetrace.io import import_llamacpp

DOMAINS = ["domain-1-code", "domain-2-math", "domain-3-creative", "domain-4-factual", "domain-5-mixed"]


def make_llamacpp_trace(rng, n_domains=None, L=None, K=None, max_batch=3) -> RefTrace:
    """Random trace: per domain, files of 1..max_batch tokens; rows in store order."""
    n_domains = int(rng.integers(1, 4)) if n_domains is None else n_domains
    L = int(rng.integers(1, 4)) if L is None else L
    K = int(rng.integers(1, 4)) if K is None else K
    E = int(rng.integers(K, K + 8))
    names = sorted(rng.choice(DOMAINS, n_domains, replace=False).tolist())
    seq, pos, domain, files = [], [], [], []
    for s, name in enumerate(names):
        sizes = rng.integers(1, max_batch + 1, int(rng.integers(1, 5)))
        files.append(sizes.tolist())
        n = int(sizes.sum())
        seq.append(np.full(n, s))
        pos.append(np.arange(n))
        domain += [name] * n
    seq = np.concatenate(seq).astype(np.int64)
    N = len(seq)
    experts = np.stack([rng.permutation(E)[:K] for _ in range(N * L)]).reshape(N, L, K).astype(np.int64)
    layer_ids = sorted(rng.choice(L + 20, L, replace=False).tolist())
    trace = RefTrace(seq=seq, pos=np.concatenate(pos).astype(np.int32), labels={"domain": np.array(domain)},
                     experts=experts, layer_ids=layer_ids, n_experts=int(experts.max()) + 1)
    trace.files = files  # tokens per file, per domain
    return trace


def _entry(layer, component, ids, K, n_tokens, k_field, extra=None):
    entry = {"entry_id": 0, "timestamp_ns": 1731600000000, "operation_type": "MUL_MAT_ID", "layer_id": layer,
             "dst_name": f"ffn_moe_{component}-{layer}",
             "sources": [{"name": f"blk.{layer}.ffn_{component}_exps.weight", "ne": [2048, 768, 32, 1]},
                         {"name": f"ffn_moe_input-{layer}", "ne": [2048, 1, n_tokens, 1]}],
             "expert_ids": [int(v) for v in ids]}
    if k_field == "n_expert_used":
        entry["n_expert_used"] = K
    elif k_field == "sources":
        entry["sources"].append({"name": f"ffn_moe_topk-{layer}", "ne": [K, n_tokens, 1, 1]})
    elif k_field == "ids_ne":
        entry["ids_ne"] = [K, n_tokens, 1, 1]
    elif k_field == "dst_ne":
        entry["dst_ne"] = [768, K, n_tokens, 1]
    entry.update(extra or {})
    return entry


def write_llamacpp_trace(trace, directory: Path, rng, k_field="sources", split_calls=True, shuffle=False) -> dict:
    """Write ``DIR/<domain>/traces/token-NNNNN.json`` (NNNNN = first token's position).

    Each file: some unrelated entries, a MUL_MAT_ID entry with empty expert_ids, and per
    call (a file's tokens may be split into two micro-batch calls) and layer the gate, up
    and down entries repeating the same ids. ``shuffle``: entries of a file in random
    order, except that the calls of one layer and component keep their order (the order
    that says which tokens come first); files written in random order.
    """
    N, L, K = trace.experts.shape
    row = 0
    files = []
    for s, name in enumerate(sorted(set(trace.labels["domain"].tolist()))):
        traces = directory / name / "traces"
        traces.mkdir(parents=True)
        pos = 0
        for size in trace.files[s]:
            block = trace.experts[row:row + size]
            cuts = [0, size]
            if split_calls and size > 1 and rng.random() < 0.5:
                cuts = [0, int(rng.integers(1, size)), size]
            entries = [{"entry_id": 0, "operation_type": "MUL_MAT", "layer_id": -1, "dst_name": "output",
                        "expert_ids": []},
                       {"entry_id": 1, "operation_type": "MUL_MAT_ID", "layer_id": trace.layer_ids[0],
                        "dst_name": "ffn_moe_probe", "expert_ids": []}]
            for a, b in zip(cuts[:-1], cuts[1:]):
                for l, layer in enumerate(trace.layer_ids):
                    ids = block[a:b, l, :].reshape(-1)
                    for component in ("gate", "up", "down"):
                        entries.append(_entry(layer, component, ids, K, b - a, k_field))
                        entries.append({"entry_id": 9, "operation_type": "ADD", "layer_id": layer,
                                        "dst_name": f"ffn_out-{layer}"})
            if shuffle:
                entries = _interleave(entries, rng)
            payload = {"token_index": pos, "n_tokens": size, "entries": entries}
            files.append((traces / f"token-{pos:05d}.json", json.dumps(payload)))
            pos += size
            row += size
    for i in rng.permutation(len(files)) if shuffle else range(len(files)):
        files[i][0].write_text(files[i][1])
    return {"dir": directory, "extra": []}


def _interleave(entries: list[dict], rng) -> list[dict]:
    """Entries in random order; those of one (layer, dst_name) stream keep their relative order."""
    def stream(e):
        return (e.get("layer_id"), e.get("dst_name"), e.get("operation_type"))

    shuffled = [entries[i] for i in rng.permutation(len(entries))]
    queues = {}
    for e in entries:
        queues.setdefault(stream(e), []).append(e)
    return [queues[stream(e)].pop(0) for e in shuffled]


class TestLlamacppImporter(ImporterContract):
    command = "import-llamacpp"
    broken_shape = {"n_domains": 2, "L": 2, "K": 2}
    shuffle_shape = {"n_domains": 3, "L": 3, "K": 2}

    def make_trace(self, rng, **shape):
        return make_llamacpp_trace(rng, **shape)

    def write_source(self, trace, directory, rng, shuffle=True):
        return write_llamacpp_trace(trace, directory, rng, shuffle=shuffle)

    def run_import(self, source, out, **kwargs):
        return import_llamacpp(source["dir"], out, **kwargs)

    def cli_args(self, source, out):
        return [str(source["dir"]), str(out), "--chunk-rows", str(CHUNK), *source["extra"]]

    def broken_sources(self, trace, directory, rng):
        counter = iter(range(100))

        def fresh(k_field="sources"):
            d = directory / f"case{next(counter)}"
            return write_llamacpp_trace(trace, d, rng, k_field=k_field, split_calls=False)

        def first_file(source):
            return sorted((source["dir"]).glob("*/traces/token-*.json"))[0]

        def edit(source, fn):
            path = first_file(source)
            data = json.loads(path.read_text())
            fn(data["entries"])
            path.write_text(json.dumps(data))
            return source

        src = fresh()
        path = first_file(src)
        path.write_text(path.read_text()[:200])
        yield "truncated", src, [path.name, "line 1, column", "invalid JSON"]

        def disagree(entries):
            up = next(e for e in entries if e.get("dst_name", "").startswith("ffn_moe_up"))
            up["expert_ids"][0] = (up["expert_ids"][0] + 1) % 1000
        yield "disagree", edit(fresh(), disagree), ["token-00000.json", f"layer {trace.layer_ids[0]}", "disagree"]
        yield "no top-k", fresh(k_field=None), ["token-00000.json", "--top-k"]

        def floats(entries):
            gate = next(e for e in entries if e.get("dst_name", "").startswith("ffn_moe_gate"))
            gate["expert_ids"][0] = 1.5
        yield "float ids", edit(fresh(), floats), ["token-00000.json", "expert_ids", "integers"]
        src = fresh()
        path = first_file(src)
        path.write_text(json.dumps({"tokens": []}))
        yield "no entries", src, [path.name, "'entries'"]
        src = fresh()
        src["extra"] = ["--n-experts", "1"]
        yield "n_experts", src, ["expert id", "n_experts=1"]

        def drop_layer(entries):
            last = trace.layer_ids[-1]
            entries[:] = [e for e in entries if e.get("layer_id") != last]
        yield "missing layer", edit(fresh(), drop_layer), ["token-00000.json", "records layers"]

        def odd_length(entries):
            for e in entries:
                if e.get("expert_ids") and e["layer_id"] == trace.layer_ids[0]:
                    e["expert_ids"].append(0)
        yield "length", edit(fresh(), odd_length), ["token-00000.json", "multiple of top-k"]
        empty = directory / "empty"
        empty.mkdir()
        yield "empty dir", {"dir": empty, "extra": []}, [str(empty), "no <domain>/traces"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_domains=st.integers(1, 3), L=st.integers(1, 3), K=st.integers(1, 4),
       k_field=st.sampled_from(["n_expert_used", "sources", "ids_ne", "dst_ne", None]), split=st.booleans())
def test_random_traces_import_exactly(seed, n_domains, L, K, k_field, split):
    rng = np.random.default_rng(seed)
    trace = make_llamacpp_trace(rng, n_domains=n_domains, L=L, K=K)
    with tempfile.TemporaryDirectory() as tmp:
        source = write_llamacpp_trace(trace, Path(tmp) / "src", rng, k_field=k_field, split_calls=split)
        top_k = K if k_field is None else None
        store = import_llamacpp(source["dir"], Path(tmp) / "o.zarr", top_k=top_k, progress=False, chunk_rows=CHUNK)
        assert_store_equals_trace(store, trace)


def _notebook_loader(domain_path: Path) -> list[dict]:
    """Seed 002's ``extract_expert_activations``, verbatim in logic (one row per id, [:4])."""
    activations = []
    for token_id in range(100):
        token_file = domain_path / "traces" / f"token-{token_id:05d}.json"
        if not token_file.exists():
            continue
        data = json.loads(token_file.read_text())
        for entry in data["entries"]:
            if entry["operation_type"] != "MUL_MAT_ID" or not entry["expert_ids"]:
                continue
            if "ffn_moe_gate" not in entry["dst_name"]:
                continue
            for position, expert_id in enumerate(entry["expert_ids"][:4]):
                activations.append({"domain": domain_path.name, "token_id": token_id,
                                    "layer_id": entry["layer_id"], "expert_id": expert_id, "position": position})
    return activations


def test_single_token_files_match_the_seed_notebook(tmp_path):
    """With one token per file and K = 4, the store's counts equal the notebook loader's."""
    rng = np.random.default_rng(5)
    trace = make_llamacpp_trace(rng, n_domains=3, L=3, K=4, max_batch=1)
    source = write_llamacpp_trace(trace, tmp_path / "src", rng)
    store = import_llamacpp(source["dir"], tmp_path / "o.zarr", progress=False, chunk_rows=CHUNK)
    rows = [a for d in sorted(source["dir"].iterdir()) for a in _notebook_loader(d)]
    want = Counter((a["domain"], a["token_id"], a["layer_id"], a["position"], a["expert_id"]) for a in rows)
    data = store.read(["pos", "domain", "experts"])
    domains = store.decode_label("domain", data["domain"])
    got = Counter()
    for (n, l, k), e in np.ndenumerate(data["experts"]):
        got[(str(domains[n]), int(data["pos"][n]), int(store.layer_ids[l]), k, int(e))] += 1
    assert got == want


def test_prompt_batch_imports_every_token(tmp_path):
    """A 3-token prompt entry gives 3 tokens (the notebook's [:4] would keep only the first)."""
    traces = tmp_path / "d" / "bio" / "traces"
    traces.mkdir(parents=True)
    ids = [[1, 2], [3, 4], [5, 0]]
    entries = [_entry(7, c, np.ravel(ids), 2, 3, "ids_ne") for c in ("gate", "up", "down")]
    (traces / "token-00000.json").write_text(json.dumps({"entries": entries}))
    entries = [_entry(7, c, [4, 1], 2, 1, "ids_ne") for c in ("gate", "up", "down")]
    (traces / "token-00003.json").write_text(json.dumps({"entries": entries}))
    store = import_llamacpp(tmp_path / "d", tmp_path / "o.zarr", progress=False, chunk_rows=CHUNK)
    data = store.read(["seq", "pos", "experts"])
    assert data["pos"].tolist() == [0, 1, 2, 3]
    assert data["experts"][:, 0, :].tolist() == [[1, 2], [3, 4], [5, 0], [4, 1]]
    assert store.layer_ids.tolist() == [7] and store.n_experts == 6
    assert store.labels == {"domain": ["bio"]}


def test_top_k_flag_must_agree_with_the_entries(tmp_path):
    rng = np.random.default_rng(3)
    trace = make_llamacpp_trace(rng, n_domains=1, L=1, K=2)
    source = write_llamacpp_trace(trace, tmp_path / "src", rng, k_field="n_expert_used")
    with pytest.raises(MoetraceError, match="disagrees with top-k 3"):
        import_llamacpp(source["dir"], tmp_path / "o.zarr", top_k=3, progress=False)
    assert not (tmp_path / "o.zarr").exists()


# ---------------------------------------------------------------------- values that do not fit, deep JSON
def _one_file(tmp_path, text: str) -> Path:
    traces = tmp_path / "d" / "bio" / "traces"
    traces.mkdir(parents=True)
    (traces / "token-00000.json").write_text(text)
    return tmp_path / "d"


@pytest.mark.parametrize("text, fragments", [
    (json.dumps({"entries": [_entry(10**20, "gate", [1], 1, 1, "n_expert_used")]}), ["layer_id", str(10**20)]),
    (json.dumps({"entries": [_entry(2**31, "gate", [1], 1, 1, "n_expert_used")]}), ["layer_id", str(2**31)]),
    (json.dumps({"entries": [_entry(0, "gate", [2**64 - 1], 1, 1, "n_expert_used")]}),
     ["expert_ids[0]", str(2**64 - 1)]),
    (json.dumps({"entries": [_entry(0, "gate", [70000], 1, 1, "n_expert_used")]}), ["expert_ids[0]", "70000"]),
    (json.dumps({"entries": [{**_entry(0, "gate", [1, 1], 1, 2, "n_expert_used"), "expert_ids": [1, True]}]}),
     ["expert_ids", "True"]),
    (json.dumps({"entries": [_entry(0, "gate", [1], 1, 1, None, {"sources": 5})]}), ["--top-k"]),
    ("[" * 100000 + "]" * 100000, ["nested too deeply"]),
    ('{"entries": ' + "[" * 5000 + "]" * 5000 + "}", ["nested too deeply"]),
])
def test_values_that_do_not_fit_and_deep_json_are_one_line_errors(tmp_path, capsys, text, fragments):
    directory = _one_file(tmp_path, text)
    out = tmp_path / "o.zarr"
    code = main(["import-llamacpp", str(directory), str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moetrace import-llamacpp: error: ")
    assert "token-00000.json" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not list(tmp_path.glob("o.zarr*"))
