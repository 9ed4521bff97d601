"""import-routed (npy, vLLM, SGLang, Megatron-LM routing arrays): contract, prompt/generated marking, errors.

Sources are written the way each engine writes them (see the format modules' docstrings
for where in the engine's source each layout comes from).
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import numpy as np
import pytest
from io_contract import CHUNK, ImporterContract, RefTrace, assert_store_equals_trace

from moetrace.cli import main
from moetrace.errors import MoetraceError
from moetrace.io import import_routed
from moetrace.io.routed import FORMATS
from moetrace.store import TraceStore

TOPICS = ["math", "code", "chat"]


def _object_npy() -> bytes:
    """A .npy file of dtype object (what numpy's pickling save writes for objects), built
    by hand: its header says ``|O``, so a reader with ``allow_pickle=False`` must refuse it; the body
    is never reached."""
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }"
    header += " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode("latin1") + b"\x00" * 16


def make_routed_trace(rng, n_seq=None, L=None, K=None, max_len=6) -> RefTrace:
    """Random per-request trace: each sequence has a prompt part and a generated part; rows in store order."""
    n_seq = int(rng.integers(1, 5)) if n_seq is None else n_seq
    L = int(rng.integers(1, 4)) if L is None else L
    K = int(rng.integers(1, 4)) if K is None else K
    E = int(rng.integers(K, K + 8))
    lengths = rng.integers(2, max_len + 1, n_seq)
    prompt = np.array([int(rng.integers(1, n)) for n in lengths])  # >= 1 prompt and >= 1 generated row
    seq = np.repeat(np.arange(n_seq), lengths).astype(np.int64)
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    N = len(seq)
    experts = np.stack([rng.permutation(E)[:K] for _ in range(N * L)]).reshape(N, L, K).astype(np.int64)
    topic = rng.choice(TOPICS, n_seq)
    trace = RefTrace(seq=seq, pos=pos, labels={"topic": topic[seq]}, experts=experts, layer_ids=list(range(L)),
                     n_experts=int(experts.max()) + 1)
    trace.lengths, trace.prompt, trace.topic = lengths.tolist(), prompt.tolist(), topic.tolist()
    trace.token_id = rng.integers(0, 50000, N).astype(np.int64)
    trace.generated = np.concatenate([np.arange(n) >= p for n, p in zip(lengths, prompt)])
    return trace


def _per_seq(trace: RefTrace):
    """(index, experts [T, L, K], token ids [T], prompt length) of each sequence."""
    start = 0
    for s, (n, p) in enumerate(zip(trace.lengths, trace.prompt)):
        yield s, trace.experts[start:start + n], trace.token_id[start:start + n], p
        start += n


def _write_labels(trace: RefTrace, path: Path, keys: list[str]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["request_id", "topic"])
        for key, topic in zip(keys, trace.topic):
            writer.writerow([key, topic])
    return path


class RoutedContract(ImporterContract):
    command = "import-routed"
    fmt = ""
    broken_shape = {"n_seq": 2, "L": 2, "K": 2}
    shuffle_shape = {"n_seq": 4}

    def make_trace(self, rng, **shape):
        return make_routed_trace(rng, **shape)

    def run_import(self, source, out, **kwargs):
        src, labels = source
        return import_routed(src, out, format=self.fmt, labels_file=labels, top_k=self.top_k(src), **kwargs)

    def top_k(self, src):
        return None

    def cli_args(self, source, out):
        src, labels = source
        k = self.top_k(src)
        return [str(src), str(out), "--format", self.fmt, "--labels", str(labels), *(["--top-k", str(k)] if k else [])]

    def test_every_sequence_records_its_request_id_and_source(self, tmp_path):
        """sequences/request_id and sequences/source say where each sequence came from: the request id
        maps to the sequence's own label in the labels file, the source names a file under SRC."""
        trace, (src, labels) = self.build(tmp_path, seed=5)
        store = self.run_import((src, labels), tmp_path / "s.zarr", progress=False, chunk_rows=CHUNK)
        meta = store.read_sequences()
        np.testing.assert_array_equal(meta["seq"], np.arange(len(meta["seq"])))
        with open(labels, newline="") as fh:
            records = ([json.loads(line) for line in fh if line.strip()] if Path(labels).suffix == ".jsonl"
                       else list(csv.DictReader(fh)))
        topic_of = {str(r["request_id"]): str(r["topic"]) for r in records}
        rows = store.read(["seq", "topic"])
        first = np.searchsorted(rows["seq"], meta["seq"])
        topics = store.decode_label("topic", rows["topic"][first])
        assert [topic_of[str(k)] for k in meta["request_id"]] == topics.tolist()
        root = Path(src) if Path(src).is_dir() else Path(src).parent  # sources are relative to it
        assert all((root / str(s).split(":")[0]).is_file() for s in meta["source"]), meta["source"][:3]

    def test_generated_and_token_ids(self, tmp_path):
        """Prompt and generated tokens are marked as the engine reports them; token ids where it gives them."""
        trace, source = self.build(tmp_path, seed=7)
        store = self.run_import(source, tmp_path / "g.zarr", progress=False, chunk_rows=CHUNK)
        data = store.read(["generated", "token_id"])
        np.testing.assert_array_equal(data["generated"], self.expected_generated(trace))
        np.testing.assert_array_equal(data["token_id"], self.expected_token_id(trace))

    def expected_generated(self, trace):
        return trace.generated

    def expected_token_id(self, trace):
        return trace.token_id


# ---------------------------------------------------------------------------------------------- npy
class TestNpyContract(RoutedContract):
    fmt = "npy"

    def write_source(self, trace, directory, rng, shuffle=True):
        directory.mkdir(parents=True)
        order = rng.permutation(len(trace.lengths)) if shuffle else range(len(trace.lengths))
        items = list(_per_seq(trace))
        dtypes = [np.int64, np.int32, np.uint16, np.int16, np.uint8]
        for s in order:
            _, experts, _, _ = items[s]
            np.save(directory / f"req-{s:03d}.npy", experts.astype(dtypes[s % len(dtypes)]))
        keys = [f"req-{s:03d}" for s in range(len(items))]
        return directory, _write_labels(trace, directory.parent / "labels.csv", keys)

    def expected_generated(self, trace):
        return np.zeros(len(trace), bool)

    def expected_token_id(self, trace):
        return np.full(len(trace), -1)

    def broken_sources(self, trace, directory, rng):
        good, labels = self.write_source(trace, directory / "good", rng, shuffle=False)

        def variant(name, fn):
            d = directory / name
            d.mkdir()
            for p in sorted(good.iterdir()):
                (d / p.name).write_bytes(p.read_bytes())
            return fn(d)

        yield "negative id", (variant("neg", lambda d: np.save(d / "req-000.npy", np.full((2, 2, 2), -1)) or d),
                              labels), ["req-000.npy", "row 0", "expected an expert id", "got -1"]
        yield "too large id", (variant("big", lambda d: np.save(d / "req-001.npy", np.full((2, 2, 2), 70000)) or d),
                               labels), ["req-001.npy", "row 0", "got 70000"]
        yield "float dtype", (variant("flt", lambda d: np.save(d / "req-000.npy", np.zeros((2, 2, 2))) or d),
                              labels), ["req-000.npy", "dtype float64"]
        yield "object array", (variant("obj", lambda d: [(d / "req-000.npy").write_bytes(_object_npy()), d][1]),
                               labels), ["req-000.npy", "not a plain .npy array"]
        yield "2-d array", (variant("two", lambda d: np.save(d / "req-000.npy", np.zeros((2, 2), int)) or d),
                            labels), ["req-000.npy", "shape (2, 2)"]
        yield "other top-k", (variant("k", lambda d: np.save(d / "req-001.npy", np.zeros((2, 2, 1), int)) or d),
                              labels), ["req-001.npy", "expected [2, 2]"]
        yield "truncated", (variant("trunc", lambda d: [(d / "req-000.npy").write_bytes(
            (d / "req-000.npy").read_bytes()[:-5]), d][1]), labels), ["req-000.npy"]
        yield "no files", (directory / "empty", labels), ["empty"]
        (directory / "empty").mkdir()
        bad_labels = directory / "bad_labels.csv"
        bad_labels.write_text("request_id,topic\nreq-000,math\n")
        yield "request missing from labels", (good, bad_labels), ["bad_labels.csv", "req-001"]


def test_npy_interface_exact(tmp_path):
    """The documented interface: files in sorted name order get seq 0, 1, ...; pos 0, 1, ...; --n-experts checks ids."""
    src = tmp_path / "src"
    src.mkdir()
    b = np.array([[[3, 1]], [[0, 2]]])  # [tokens=2, layers=1, top_k=2]
    a = np.array([[[1, 0]]])
    np.save(src / "b.npy", b)
    np.save(src / "a.npy", a)
    assert main(["import-routed", str(src), str(tmp_path / "o.zarr"), "--format", "npy", "--n-experts", "4", "-q"]) == 0
    store = TraceStore.open(tmp_path / "o.zarr")
    data = store.read(["seq", "pos", "experts"])
    assert data["seq"].tolist() == [0, 1, 1] and data["pos"].tolist() == [0, 0, 1]
    np.testing.assert_array_equal(data["experts"], np.concatenate([a, b]))
    assert store.n_experts == 4
    with pytest.raises(MoetraceError, match=r"b\.npy: row 0 \(token 0\), layer 0, rank 0: .*n_experts=3.*got 3"):
        import_routed(src, tmp_path / "p.zarr", format="npy", n_experts=3, progress=False)
    assert not (tmp_path / "p.zarr").exists()


# ---------------------------------------------------------------------------------------------- vLLM
class TestVllmContract(RoutedContract):
    fmt = "vllm"

    def write_source(self, trace, directory, rng, shuffle=True):
        """Chat-completion bodies as vLLM's OpenAI server returns them with --enable-return-routed-experts."""
        directory.mkdir(parents=True)
        lines = []
        for s, experts, tokens, p in _per_seq(trace):
            extra_last = bool(rng.integers(0, 2))  # vLLM has no route for the last sampled token
            choice_ids = tokens[p:].tolist() + ([int(rng.integers(0, 50000))] if extra_last else [])
            lines.append({
                "id": f"chatcmpl-{s}", "object": "chat.completion", "created": 1780000000 + s, "model": "qwen3-moe",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "..."}, "logprobs": None,
                             "finish_reason": "stop", "stop_reason": None, "token_ids": choice_ids,
                             "routed_experts": experts[p:].tolist()}],
                "usage": {"prompt_tokens": p, "completion_tokens": len(choice_ids)},
                "prompt_routed_experts": experts[:p].tolist(), "prompt_logprobs": None,
                "prompt_token_ids": tokens[:p].tolist(), "kv_transfer_params": None})
        path = directory / "responses.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return path, _write_labels(trace, directory / "labels.csv", [f"chatcmpl-{s}" for s in range(len(lines))])

    def broken_sources(self, trace, directory, rng):
        good, labels = self.write_source(trace, directory / "good", rng)
        lines = good.read_text().splitlines()

        def variant(name, edit, line=1):
            objs = [json.loads(x) for x in lines]
            edit(objs[line])
            path = directory / f"{name}.jsonl"
            path.write_text("".join(json.dumps(o) + "\n" for o in objs))
            return path, labels

        def set_id(o, v):
            o["choices"][0]["routed_experts"][0][0][0] = v

        yield "negative id", variant("neg", lambda o: set_id(o, -3)), ["line 2, choices[0]", "row", "got -3"]
        yield "float id", variant("flt", lambda o: set_id(o, 1.5)), ["line 2, choices[0]", "routed_experts"]
        yield "ragged", variant("rag", lambda o: o["prompt_routed_experts"][0].append([1])), [
            "line 2", "prompt_routed_experts"]
        yield "other layers", variant("lay", lambda o: (o.__setitem__("prompt_routed_experts", [[[0, 1]]]),
                                                       o.pop("prompt_token_ids"), o["choices"][0].pop("token_ids"),
                                                       o["choices"][0].__setitem__("routed_experts", [[[0, 1]]]))), [
            "line 2, choices[0]", "expected [2, 2]"]
        yield "no routing", variant("none", lambda o: (o.__setitem__("prompt_routed_experts", None),
                                                      o["choices"][0].__setitem__("routed_experts", None))), [
            "line 2", "--enable-return-routed-experts"]
        yield "token ids length", variant("tok", lambda o: o["choices"][0].__setitem__("token_ids", [1] * 40)), [
            "line 2, choices[0]", "token_ids has 40"]
        path = directory / "trunc.jsonl"
        path.write_text("\n".join(lines)[:-7])
        yield "truncated", (path, labels), ["trunc.jsonl", f"line {len(lines)}", "invalid JSON"]


def test_vllm_several_choices_and_label_fields(tmp_path):
    """n > 1: each choice is one sequence sharing the prompt's routes; --label-fields reads the response."""
    prompt = [[[0, 1]], [[2, 3]]]
    body = {"id": "cmpl-1", "model": "m", "prompt_routed_experts": prompt, "prompt_token_ids": [5, 6],
            "choices": [{"index": 0, "token_ids": [7], "routed_experts": [[[1, 2]]]},
                        {"index": 1, "token_ids": [8, 9], "routed_experts": [[[3, 0]]]}]}
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps(body) + "\n")
    store = import_routed(src, tmp_path / "o.zarr", format="vllm", label_fields=["model", "choice"], progress=False)
    data = store.read(["seq", "pos", "generated", "token_id", "experts", "model", "choice"])
    assert data["seq"].tolist() == [0, 0, 0, 1, 1, 1]
    assert data["generated"].tolist() == [False, False, True] * 2
    assert data["token_id"].tolist() == [5, 6, 7, 5, 6, 8]
    assert data["experts"][:, 0].tolist() == [[0, 1], [2, 3], [1, 2], [0, 1], [2, 3], [3, 0]]
    assert store.decode_label("choice", data["choice"]).tolist() == ["0"] * 3 + ["1"] * 3
    with pytest.raises(MoetraceError, match=r"r\.jsonl: line 1, choices\[0\]: label field 'lang' missing"):
        import_routed(src, tmp_path / "p.zarr", format="vllm", label_fields=["lang"], progress=False)


# ---------------------------------------------------------------------------------------------- SGLang
def _sglang_b64(rows: np.ndarray) -> str:
    return base64.b64encode(rows.astype("<i4").tobytes()).decode("ascii")


class TestSglangContract(RoutedContract):
    fmt = "sglang"

    def top_k(self, src):
        return json.loads(Path(src).read_text().splitlines()[0])["_k"] if Path(src).is_file() else None

    def write_source(self, trace, directory, rng, shuffle=True):
        """/generate bodies: meta_info.routed_experts = base64(int32 [prompt + completion - 1, L, K])."""
        directory.mkdir(parents=True)
        lines = []
        for s, experts, tokens, p in _per_seq(trace):
            last = int(rng.integers(0, 50000))  # the last generated token, never fed back: no route
            output_ids = tokens[p:].tolist() + [last]
            lines.append({"_k": trace.experts.shape[2], "text": "...", "output_ids": output_ids,
                          "meta_info": {"id": f"req{s}", "finish_reason": {"type": "stop"}, "prompt_tokens": p,
                                        "completion_tokens": len(output_ids), "cached_tokens": 0,
                                        "e2e_latency": 0.1, "routed_experts": _sglang_b64(experts)}})
        path = directory / "generate.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return path, _write_labels(trace, directory / "labels.csv", [f"req{s}" for s in range(len(lines))])

    def expected_token_id(self, trace):
        return np.where(trace.generated, trace.token_id, -1)

    def broken_sources(self, trace, directory, rng):
        good, labels = self.write_source(trace, directory / "good", rng)
        lines = good.read_text().splitlines()

        def variant(name, edit, line=1):
            objs = [json.loads(x) for x in lines]
            edit(objs[line]["meta_info"])
            path = directory / f"{name}.jsonl"
            path.write_text("".join(json.dumps(o) + "\n" for o in objs))
            return path, labels

        def negate(meta):
            rows = np.frombuffer(base64.b64decode(meta["routed_experts"]), "<i4").copy()
            rows[0] = -7
            meta["routed_experts"] = _sglang_b64(rows)

        yield "negative id", variant("neg", negate), ["line 2", "row 0", "got -7"]
        yield "not base64", variant("b64", lambda m: m.__setitem__("routed_experts", "@@@")), ["line 2", "base64"]
        yield "wrong count", variant("cnt", lambda m: m.__setitem__("prompt_tokens", m["prompt_tokens"] + 1)), [
            "line 2", "do not fill"]
        yield "missing", variant("miss", lambda m: m.pop("routed_experts")), ["line 2", "return_routed_experts"]
        yield "bad count type", variant("typ", lambda m: m.__setitem__("completion_tokens", "3")), [
            "line 2", "completion_tokens"]


def test_sglang_needs_top_k_and_reads_batched_lines(tmp_path):
    rows = np.array([[[1, 2], [3, 0]], [[2, 1], [0, 3]]])  # prompt 2 + completion 1 - 1 = 2 rows, L=2, K=2
    item = {"output_ids": [9], "meta_info": {"id": "a", "prompt_tokens": 2, "completion_tokens": 1,
                                             "routed_experts": _sglang_b64(rows)}}
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps([item, {**item, "meta_info": {**item["meta_info"], "id": "b"}}]) + "\n")
    with pytest.raises(MoetraceError, match="--top-k: required"):
        import_routed(src, tmp_path / "o.zarr", format="sglang", progress=False)
    store = import_routed(src, tmp_path / "o.zarr", format="sglang", top_k=2, progress=False)
    assert store.n_layers == 2 and len(store) == 4
    np.testing.assert_array_equal(store.read(["experts"])["experts"], np.concatenate([rows, rows]))
    assert not store.read(["generated"])["generated"].any()  # both rows are prompt tokens


# ---------------------------------------------------------------------------------------------- Megatron
class TestMegatronContract(RoutedContract):
    fmt = "megatron"
    broken_shape = {"n_seq": 2, "L": 2, "K": 2}

    def make_trace(self, rng, **shape):
        trace = make_routed_trace(rng, **shape)
        trace.layer_ids = sorted(rng.choice(40, trace.experts.shape[1], replace=False).tolist())
        return trace

    def write_source(self, trace, directory, rng, shuffle=True):
        """router_trace_rank<R>.jsonl: one line per (step, layer) with top_indices [tokens][K]."""
        directory.mkdir(parents=True)
        items = list(_per_seq(trace))
        half = -(-len(items) // 2)
        per_rank = {}
        for s, experts, _, _ in items:
            rank, step = divmod(s, half)  # (rank, step) order = store order: files by name, steps in order
            for li, layer in enumerate(trace.layer_ids):
                per_rank.setdefault(rank, []).append({"rank": rank, "step": step, "layer": layer,
                                                      "top_indices": experts[:, li].tolist()})
        for rank, lines in per_rank.items():
            if shuffle:  # the layers of a step may come in any order
                lines = [lines[i] for i in rng.permutation(len(lines))]
                lines.sort(key=lambda d: d["step"])
            (directory / f"router_trace_rank{rank}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        labels = directory / "labels.jsonl"
        labels.write_text("".join(json.dumps({"request_id": "%d:%d:0:0" % divmod(s, half), "topic": topic}) + "\n"
                                  for s, topic in enumerate(trace.topic)))
        return directory, labels

    def expected_generated(self, trace):
        return np.zeros(len(trace), bool)

    def expected_token_id(self, trace):
        return np.full(len(trace), -1)

    def broken_sources(self, trace, directory, rng):
        good, labels = self.write_source(trace, directory / "good", rng, shuffle=False)

        def variant(name, edit):
            d = directory / name
            d.mkdir()
            for p in sorted(good.glob("*.jsonl")):
                lines = [json.loads(x) for x in p.read_text().splitlines()]
                if p.name == "router_trace_rank0.jsonl":
                    edit(lines)
                (d / p.name).write_text("".join(json.dumps(x) + "\n" for x in lines))
            return d, labels

        yield "negative id", variant("neg", lambda ls: ls[1]["top_indices"][0].__setitem__(0, -2)), [
            "router_trace_rank0.jsonl: line 1", "got -2"]
        yield "missing field", variant("miss", lambda ls: ls[1].pop("step")), [
            "router_trace_rank0.jsonl: line 2", "step"]
        yield "token count", variant("cnt", lambda ls: ls[1]["top_indices"].append([0, 1])), [
            "router_trace_rank0.jsonl: line 2", "shape"]
        yield "duplicate layer", variant("dup", lambda ls: ls.append(dict(ls[0]))), [
            "router_trace_rank0.jsonl", "micro-batch 1 has layers"]
        yield "no files", (directory / "empty", labels), ["router_trace_rank"]
        (directory / "empty").mkdir()


def test_megatron_layer_ids_and_label_fields(tmp_path):
    lines = [{"rank": 0, "step": 3, "layer": 5, "top_indices": [[1, 0], [2, 3]]},
             {"rank": 0, "step": 3, "layer": 2, "top_indices": [[0, 1], [3, 2]]}]
    (tmp_path / "router_trace_rank0.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    store = import_routed(tmp_path, tmp_path / "o.zarr", format="megatron", label_fields=["step"], progress=False)
    assert store.layer_ids.tolist() == [2, 5]
    np.testing.assert_array_equal(store.read(["experts"])["experts"], [[[0, 1], [1, 0]], [[3, 2], [2, 3]]])
    assert store.decode_label("step", store.read(["step"])["step"]).tolist() == ["3", "3"]


def test_every_format_is_registered_and_tested():
    tested = {cls.fmt for cls in RoutedContract.__subclasses__()}
    assert tested == set(FORMATS)


# ------------------------------------------------------------------- dense layers, layer ids, fill rows
def _sglang_line(rows: np.ndarray, rid: str) -> dict:
    return {"output_ids": [9], "meta_info": {"id": rid, "prompt_tokens": len(rows), "completion_tokens": 1,
                                             "routed_experts": _sglang_b64(rows)}}


def test_sglang_dense_layers_are_dropped_not_counted_as_expert_0(tmp_path):
    """SGLang's buffers span every decoder layer; a DeepSeek-style model's dense layer 0 stays all
    zeros. It is dropped (layer ids 1, 2 of the source kept), so no token is counted K times on expert 0."""
    from moetrace.counting import count

    rng = np.random.default_rng(0)
    moe = np.stack([rng.permutation(8)[:4] for _ in range(10 * 2)]).reshape(10, 2, 4)
    rows = np.concatenate([np.zeros((10, 1, 4), np.int64), moe], axis=1)  # [T, 3 layers, top-4]
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps(_sglang_line(rows, "a")) + "\n")
    store = import_routed(src, tmp_path / "o.zarr", format="sglang", top_k=4, progress=False)
    assert store.layer_ids.tolist() == [1, 2]
    np.testing.assert_array_equal(store.read(["experts"])["experts"], moe)
    counts = count(store, stats=["experts"], progress=False)
    assert int(counts["experts"].sum()) == 10 * 2 * 4
    assert int(counts["experts"].sel(expert=0).sum()) == int((moe == 0).sum())


def test_a_repeated_expert_id_outside_a_dense_layer_names_file_row_and_layer(tmp_path):
    rows = np.array([[[1, 2], [3, 0]], [[2, 1], [0, 0]]])  # row 1, layer 1 repeats 0 (layer 1 is not all zeros)
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps(_sglang_line(rows, "a")) + "\n")
    with pytest.raises(MoetraceError, match=r"g\.jsonl: line 1: row 1, layer 1: expected 2 distinct expert ids "
                                            r"in a token's top-k, got \[0, 0\]"):
        import_routed(src, tmp_path / "o.zarr", format="sglang", top_k=2, progress=False)
    assert not (tmp_path / "o.zarr").exists()


def _vllm_body(prompt, gen, **extra) -> dict:
    return {"id": "cmpl-1", "prompt_routed_experts": prompt, "choices": [{"index": 0, "routed_experts": gen, **extra}]}


@pytest.mark.parametrize("how", ["layer-ids", "config"])
def test_moe_only_layer_indices_map_onto_the_models_layers(tmp_path, how):
    """Newer vLLM indexes MoE layers 0, 1, ...; the model's MoE layers are 1 and 2
    (first_k_dense_replace=1): --layer-ids or --config maps them, so the store says 1, 2."""
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps(_vllm_body([[[0, 1], [2, 3]]], [[[1, 2], [3, 0]]])) + "\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "deepseek_v3", "num_hidden_layers": 3, "first_k_dense_replace": 1}))
    args = ["import-routed", str(src), str(tmp_path / "o.zarr"), "--format", "vllm", "--quiet"]
    args += ["--layer-ids", "1,2"] if how == "layer-ids" else ["--config", str(config)]
    assert main(args) == 0
    assert TraceStore.open(tmp_path / "o.zarr").layer_ids.tolist() == [1, 2]
    with pytest.raises(MoetraceError, match=r"--layer-ids: expected 2 ids \(the MoE layers of .*\), got 3"):
        import_routed(src, tmp_path / "p.zarr", format="vllm", layer_ids=[1, 2, 3], progress=False)
    config.write_text(json.dumps({"num_hidden_layers": 5, "first_k_dense_replace": 1}))
    with pytest.raises(MoetraceError, match=r"the model has 4 MoE layers of 5, .* has 2 routed layers"):
        import_routed(src, tmp_path / "q.zarr", format="vllm", config=config, progress=False)


def test_moe_layer_ids_follow_each_familys_config_fields():
    from moetrace.io.routed import moe_layer_ids

    assert moe_layer_ids({"num_hidden_layers": 4, "first_k_dense_replace": 3}) == ([3], 4)  # DeepSeek, GLM-4.5
    assert moe_layer_ids({"num_hidden_layers": 6, "first_k_dense_replace": 1, "moe_layer_freq": 2}) == ([2, 4], 6)
    assert moe_layer_ids({"num_hidden_layers": 4, "decoder_sparse_step": 2}) == ([1, 3], 4)  # Qwen-MoE
    assert moe_layer_ids({"num_hidden_layers": 3, "mlp_only_layers": [0]}) == ([1, 2], 3)
    assert moe_layer_ids({"text_config": {"num_hidden_layers": 2}}) == ([0, 1], 2)
    with pytest.raises(MoetraceError, match="expected a positive num_hidden_layers"):
        moe_layer_ids({})


def test_a_config_over_every_decoder_layer_keeps_exactly_its_moe_layers(tmp_path):
    """An SGLang source over all 3 decoder layers with --config: layer 0 is dense by the config (and
    all zeros), kept layers get the config's ids; a config that calls a routed layer dense is refused."""
    rows = np.array([[[0, 0], [1, 2], [3, 0]], [[0, 0], [2, 1], [0, 3]]])
    src = tmp_path / "g.jsonl"
    src.write_text(json.dumps(_sglang_line(rows, "a")) + "\n")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"num_hidden_layers": 3, "first_k_dense_replace": 1}))
    store = import_routed(src, tmp_path / "o.zarr", format="sglang", top_k=2, config=config, progress=False)
    assert store.layer_ids.tolist() == [1, 2]
    config.write_text(json.dumps({"num_hidden_layers": 3, "first_k_dense_replace": 2}))
    with pytest.raises(MoetraceError, match="layer 1 is a dense layer of this model, but .* routes tokens there"):
        import_routed(src, tmp_path / "p.zarr", format="sglang", top_k=2, config=config, progress=False)


def test_vllm_completions_prompt_token_ids_inside_the_choice(tmp_path):
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps(_vllm_body([[[0, 1]], [[2, 3]]], [[[1, 2]]], prompt_token_ids=[5, 6], token_ids=[7])))
    store = import_routed(src, tmp_path / "o.zarr", format="vllm", progress=False)
    assert store.read(["token_id"])["token_id"].tolist() == [5, 6, 7]


def test_vllm_unfilled_rows_are_dropped_and_the_rest_keep_their_positions(tmp_path):
    """vLLM's host buffer is filled with -1: an all -1 row is padding (dropped, with a warning); the
    rows after it keep their position; a row only partly -1 is an error."""
    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps(_vllm_body([[[0, 1]], [[-1, -1]], [[2, 3]]], [[[1, 2]]])) + "\n")
    with pytest.warns(UserWarning, match="dropped 1 row"):
        store = import_routed(src, tmp_path / "o.zarr", format="vllm", progress=False)
    data = store.read(["pos", "experts", "generated"])
    assert data["pos"].tolist() == [0, 2, 3]
    assert data["experts"][:, 0].tolist() == [[0, 1], [2, 3], [1, 2]]
    assert data["generated"].tolist() == [False, False, True]
    src.write_text(json.dumps(_vllm_body([[[0, 1]], [[-1, 4]]], [[[1, 2]]])) + "\n")
    with pytest.raises(MoetraceError, match=r"row 1 \(token 1\), layer 0, rank 0: expected an expert id in .* got -1"):
        import_routed(src, tmp_path / "p.zarr", format="vllm", progress=False)


# ------------------------------------------------------------------- a real model's routing, every format
def _write_engine_source(fmt: str, directory: Path, prompt: list[int], generated: list[int], experts: np.ndarray):
    """One generation's routing (``experts`` [T, 2 MoE layers, K] of a 3-layer model whose layer 0 is dense)
    written as ``fmt``'s engine writes it; returns (src, import_routed keyword arguments)."""
    directory.mkdir()
    p = len(prompt)
    config = directory / "config.json"
    config.write_text(json.dumps({"model_type": "deepseek_v3", "num_hidden_layers": 3, "first_k_dense_replace": 1}))
    if fmt == "npy":
        np.save(directory / "0.npy", experts)
        return directory, {"layer_ids": [1, 2]}
    if fmt == "vllm":  # newer vLLM: MoE layers indexed 0, 1; the config maps them
        body = {"id": "r0", "prompt_token_ids": prompt, "prompt_routed_experts": experts[:p].tolist(),
                "choices": [{"index": 0, "token_ids": generated, "routed_experts": experts[p:].tolist()}]}
        (directory / "r.jsonl").write_text(json.dumps(body) + "\n")
        return directory / "r.jsonl", {"config": config}
    if fmt == "sglang":  # buffers over every decoder layer: the dense layer 0 stays zeros
        full = np.concatenate([np.zeros((len(experts), 1, experts.shape[2]), np.int64), experts], axis=1)
        line = {"output_ids": generated, "meta_info": {"id": "r0", "prompt_tokens": p,
                                                       "completion_tokens": len(generated),
                                                       "routed_experts": _sglang_b64(full)}}
        (directory / "g.jsonl").write_text(json.dumps(line) + "\n")
        return directory / "g.jsonl", {"top_k": experts.shape[2]}
    assert fmt == "megatron"  # written by megatron-core's own tracer (record_indices: the model's layer numbers)
    import warnings

    import torch

    with warnings.catch_warnings():  # Megatron warns that Transformer Engine and Apex are absent
        warnings.simplefilter("ignore")
        from megatron.core.transformer.moe.router_trace import RouterTracer

    tracer = RouterTracer(str(directory), max_steps=2, rank=0, training_mode=True)
    tracer.record_indices(torch.as_tensor(experts), layer_ids=[1, 2])
    tracer.advance_step()
    tracer.flush()
    return directory, {"options": {"order": "as-written"}}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_an_imported_trace_replays_on_and_compares_with_a_capture_of_the_same_model(tmp_path, fmt):
    """A DeepSeek-V3-layout model (dense layer 0, MoE layers 1 and 2) generates under capture; its routing,
    written in the engine's format and imported, has the capture's layer ids and experts (compare: top-1
    agreement and overlap 1 in every layer), and replaying it regenerates the same tokens."""
    import torch

    from moetrace.capture import capture
    from moetrace.compare import compare, summary_json
    from moetrace.replay import replay
    from tiny_models import tiny_model

    model = tiny_model("deepseek_v3", first_k_dense_replace=1)
    prompt = [3, 4, 8, 10, 11, 6]
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    with capture(model, tmp_path / "cap.zarr") as cap, torch.no_grad():
        cap.set_batch(seq=[0])
        out = model.generate(input_ids=torch.tensor([prompt]), **gen)
    captured = TraceStore.open(tmp_path / "cap.zarr")
    assert captured.layer_ids.tolist() == [1, 2]
    experts = captured.read(["experts"])["experts"].astype(np.int64)
    generated = out[0, len(prompt):].tolist()
    src, kwargs = _write_engine_source(fmt, tmp_path / "src", prompt, generated, experts)
    store = import_routed(src, tmp_path / "o.zarr", format=fmt, n_experts=captured.n_experts, progress=False,
                          **kwargs)
    assert store.layer_ids.tolist() == [1, 2] and store.rank_order == "ranked"
    summary = summary_json(compare(store, captured))
    assert summary["tokens"] == len(experts)
    assert all(layer["top1_agreement"] == 1.0 and layer["topk_overlap"] == 1.0 for layer in summary["layers"])
    with replay(model, store) as rp, torch.no_grad():
        rp.set_batch(seq=[0])
        again = model.generate(input_ids=torch.tensor([prompt]), **gen)
        assert all(v == 0.0 for v in rp.replay_rate().values())
    assert torch.equal(again, out)
