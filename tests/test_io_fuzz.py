"""Fuzzing every importer: random valid files and malformed ones (hypothesis).

The only outcomes allowed: a store equal to an independent reading of the input (a plain
Python parse for CSV and llama.cpp JSON, DuckDB for Parquet), or a one-line
MoetraceError with nothing left behind (no ``OUT``, no ``OUT.partial-*`` staging
directory, no ``.OUT.parts-*`` temporary partitions). A valid input must import; a
malformed one may also import when the reference reading accepts it, and must then give
exactly the reference's store.

The fast suite runs a few hundred examples in all; the ``slow`` tests run thousands.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from io_contract import RefTrace, assert_store_equals_trace

from moetrace.errors import MoetraceError
from moetrace.io import import_csv, import_llamacpp, import_parquet

# No shrinking: one import takes ~0.1 s and shrinking a failure took minutes; the failing
# example is printed as drawn.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
# An "Exception ignored" traceback printed by a callback (e.g. pyarrow's invalid-row handler)
# breaks the one-line error even when the import then fails cleanly: make it a failure.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
FAST = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None, phases=PHASES)
SLOW = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                phases=PHASES)
CHUNK = 16
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)


class Invalid(Exception):
    """The reference reading refuses the input."""


def check_outcome(run, out: Path, reference, unharmed=None) -> None:
    """``run()`` imports into ``out``; ``reference()`` returns the expected RefTrace or raises Invalid.

    Success must equal the reference; failure must be a one-line MoetraceError leaving nothing.
    ``unharmed()``: the RefTrace of the input before a byte was changed, for a change the
    reference's reader refuses but another reader may rightly skip (e.g. an optional field of a
    Parquet page header that DuckDB decodes and pyarrow ignores): success must then equal it.
    """
    try:
        store = run()
    except MoetraceError as exc:
        assert "\n" not in str(exc), str(exc)
        leftovers = [p.name for p in out.parent.iterdir()
                     if p.name == out.name or p.name.startswith((f"{out.name}.partial-", f".{out.name}.parts-"))]
        assert not leftovers, (leftovers, str(exc))
        return
    try:
        want = reference()
    except Invalid as why:
        if unharmed is None or not str(why).startswith("DuckDB cannot read it"):
            raise AssertionError(f"the importer accepted input the reference refuses: {why}") from None
        try:
            want = unharmed()
        except Invalid as before:
            raise AssertionError(f"the importer accepted input the reference refuses: {why}; before the byte "
                                 f"changed: {before}") from None
    assert_store_equals_trace(store, want)


def must_import(run, reference) -> None:
    """A valid input: the import succeeds and equals the reference (which must accept it too)."""
    assert_store_equals_trace(run(), reference())


def refuse_repeated_experts(experts: np.ndarray) -> None:
    """The store's invariant, checked token by token: one token's top-k at one layer names K distinct experts."""
    for n, token in enumerate(experts):
        for li, ids in enumerate(token):
            if len(set(ids.tolist())) != len(ids):
                raise Invalid(f"token {n}, layer {li}: repeated expert ids {ids.tolist()}")


# Values a mutated field takes: wrapping integers, almost-integers, nulls, text, bad bytes.
FIELD_VALUES = st.one_of(
    st.integers(-(2**65), 2**65).map(str),
    st.integers(-3, 70).map(str),
    st.sampled_from(["", "NA", "x", " 5", "5 ", "+5", "05", "0x10", "1e3", "5.0", "-1", "-0", "inf", "nan", "1e400",
                     "65504", "65520", "3000000000", "2147483648", "9223372036854775808", '"', '""', ",", "\n", "\r",
                     "\xff", "\u00e9", "a\tb"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=5),
)


# ---------------------------------------------------------------------- CSV
_INT = re.compile(r"[ \t]*(-?(?:0[xX][0-9a-fA-F]+|\d+))[ \t]*")
_FLOAT = re.compile(r"[ \t]*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)[ \t]*")


def ref_int(text: str, lo: int, hi: int, where: str) -> int:
    m = _INT.fullmatch(text)
    if not m:
        raise Invalid(f"{where}: not an integer: {text!r}")
    s = m.group(1)
    value = int(s, 16) if "x" in s.lower() else int(s)
    if not lo <= value <= hi:
        raise Invalid(f"{where}: {value} outside [{lo}, {hi}]")
    return value


def ref_weight(text: str, where: str) -> float:
    m = _FLOAT.fullmatch(text)
    if not m:
        raise Invalid(f"{where}: not a finite number: {text!r}")
    value = float(m.group(1))
    if not np.isfinite(value) or abs(value) > 65504:
        raise Invalid(f"{where}: {value} overflows float16")
    return float(np.float16(np.float32(value)))


def ref_csv_rows(data: bytes, header: list[str], where: str) -> list[list[str]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid(f"{where}: not UTF-8") from None
    if "\x00" in text:
        raise Invalid(f"{where}: NUL")
    rows = [r for r in csv.reader(io.StringIO(text, newline="")) if r]
    if not rows or rows[0] != header:
        raise Invalid(f"{where}: header {rows[:1]}")
    for r in rows[1:]:
        if len(r) != len(header):
            raise Invalid(f"{where}: {len(r)} fields")
    return rows[1:]


def ref_import_csv(samples: bytes, topks: bytes, token_id: bool, weight: bool) -> RefTrace:
    """Seed 000's rules (csv_import's module docstring) over Python's csv module."""
    s_header = ["q_ix", "token_ix", "token", "domain"] + ["token_id"] * token_id
    t_header = ["q_ix", "token_ix", "layer_ix", "topk_ix", "expert"] + ["weight"] * weight
    tokens = {}
    for r in ref_csv_rows(samples, s_header, "samples"):
        key = (ref_int(r[0], *INT64, "q_ix"), ref_int(r[1], *INT32, "token_ix"))
        if key in tokens:
            raise Invalid(f"duplicate token {key}")
        tokens[key] = (r[2], r[3], ref_int(r[4], -1, INT32[1], "token_id") if token_id else -1)
    if not tokens:
        raise Invalid("no tokens")
    cells = {}
    for r in ref_csv_rows(topks, t_header, "topks"):
        key = (ref_int(r[0], *INT64, "q_ix"), ref_int(r[1], *INT64, "token_ix"))
        cell = (ref_int(r[2], 0, INT32[1], "layer_ix"), ref_int(r[3], 1, 65536, "topk_ix"))
        value = (ref_int(r[4], 0, 65535, "expert"), ref_weight(r[5], "weight") if weight else None)
        if key not in tokens:
            raise Invalid(f"orphan {key}")
        if (key, cell) in cells:
            raise Invalid(f"duplicate cell {key, cell}")
        cells[key, cell] = value
    if not cells:
        raise Invalid("no routing rows")
    layers = sorted({c[0] for _, c in cells})
    K = max(c[1] for _, c in cells)
    order = sorted(tokens)
    experts = np.zeros((len(order), len(layers), K), np.int64)
    weights = np.zeros(experts.shape, np.float32)
    for n, key in enumerate(order):
        for li, layer in enumerate(layers):
            for k in range(K):
                if (key, (layer, k + 1)) not in cells:
                    raise Invalid(f"missing cell {key, layer, k}")
                e, w = cells[key, (layer, k + 1)]
                experts[n, li, k] = e
                weights[n, li, k] = w if weight else 0
    refuse_repeated_experts(experts)
    return RefTrace(seq=np.array([q for q, _ in order], np.int64), pos=np.array([t for _, t in order], np.int32),
                    labels={"domain": np.array([tokens[k][1] for k in order], dtype=object)}, experts=experts,
                    layer_ids=layers, n_experts=int(experts.max()) + 1,
                    text=np.array([tokens[k][0] for k in order], dtype=object),
                    weights=weights if weight else None)


TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=4)


@st.composite
def csv_tables(draw, max_tokens=8):
    """Valid samples / topks rows (as lists of str), in random order."""
    n = draw(st.integers(1, max_tokens))
    # (q_ix span) x (token_ix span) < 2^62 (the importer's key space; wider is refused)
    keys = draw(st.lists(st.tuples(st.integers(-(2**28), 2**28) | st.integers(-3, 3),
                                   st.integers(*INT32) | st.integers(0, 20)),
                         min_size=n, max_size=n, unique=True))
    L, K = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    layers = draw(st.lists(st.integers(0, 2**31 - 1) | st.integers(0, 40), min_size=L, max_size=L, unique=True))
    token_id, weight = draw(st.booleans()), draw(st.booleans())
    samples = [[str(q), str(t), draw(TEXT), draw(TEXT)] + [str(draw(st.integers(-1, 2**31 - 1)))] * token_id
               for q, t in keys]
    # K distinct ids per token and layer (the store's invariant), so the largest is >= K - 1
    ids = {(q, t, layer): draw(st.lists(st.integers(0, 300), min_size=K, max_size=K, unique=True))
           for q, t in keys for layer in layers}
    topks = [[str(q), str(t), str(layer), str(k + 1), str(ids[q, t, layer][k])]
             + [repr(draw(st.floats(-65504, 65504, width=32)))] * weight
             for q, t in keys for layer in layers for k in range(K)]
    samples = draw(st.permutations(samples))
    topks = draw(st.permutations(topks))
    return samples, topks, token_id, weight


def csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\r\n" if any("\r" in f for r in rows for f in r) else "\n").writerows(
        [header, *rows])
    return buf.getvalue().replace("\udcff", "").encode("utf-8").replace(b"\\xff", b"\xff")


@st.composite
def csv_mutation(draw, samples: list, topks: list):
    """Rows with one edit: a field replaced, a row dropped/duplicated/shortened, or bytes cut."""
    samples, topks = [list(r) for r in samples], [list(r) for r in topks]
    target = draw(st.sampled_from(["samples", "topks"]))
    rows = samples if target == "samples" else topks
    kind = draw(st.sampled_from(["field", "field", "field", "drop", "duplicate", "short", "truncate", "byte"]))
    i = draw(st.integers(0, len(rows) - 1))
    cut = None
    if kind == "field":
        value = draw(FIELD_VALUES)
        rows[i][draw(st.integers(0, len(rows[i]) - 1))] = value.replace("\xff", "\\xff")
    elif kind == "drop" and len(rows) > 1:
        del rows[i]
    elif kind == "duplicate":
        rows.append(list(rows[i]))
    elif kind == "short":
        rows[i] = rows[i][:-1]
    elif kind in ("truncate", "byte"):
        cut = (target, kind, draw(st.floats(0.2, 1.0)), draw(st.binary(min_size=1, max_size=2)))
    return samples, topks, cut


def _run_csv(tmp: Path, samples: bytes, topks: bytes, token_id: bool, weight: bool, valid: bool) -> None:
    (tmp / "samples.csv").write_bytes(samples)
    (tmp / "topks.csv").write_bytes(topks)
    out = tmp / "o.zarr"

    def run():
        return import_csv(tmp / "samples.csv", tmp / "topks.csv", out, progress=False, chunk_rows=CHUNK,
                          memory_budget=1)  # several partitions

    def reference():
        return ref_import_csv(samples, topks, token_id, weight)

    if valid:
        must_import(run, reference)
    else:
        check_outcome(run, out, reference)


def _csv_case(data, valid: bool) -> None:
    samples, topks, token_id, weight = data.draw(csv_tables())
    s_header = ["q_ix", "token_ix", "token", "domain"] + ["token_id"] * token_id
    t_header = ["q_ix", "token_ix", "layer_ix", "topk_ix", "expert"] + ["weight"] * weight
    cut = None
    if not valid:
        samples, topks, cut = data.draw(csv_mutation(samples, topks))
    s_bytes, t_bytes = csv_bytes(s_header, samples), csv_bytes(t_header, topks)
    if cut is not None:
        target, kind, where, junk = cut
        raw = s_bytes if target == "samples" else t_bytes
        start = raw.index(b"\n") + 1  # keep the header: the reference needs the columns
        at = start + int((len(raw) - start) * where)
        raw = raw[:at] if kind == "truncate" else raw[:at] + junk.replace(b"\x00", b"\x01") + raw[at + 1:]
        s_bytes, t_bytes = (raw, t_bytes) if target == "samples" else (s_bytes, raw)
    with tempfile.TemporaryDirectory() as tmp:
        _run_csv(Path(tmp), s_bytes, t_bytes, token_id, weight, valid)


# ---------------------------------------------------------------------- llama.cpp JSON
_TRACE_FILE = re.compile(r"token-(\d+)\.json")
_SUFFIX = re.compile(r"(^blk\.\d+\.)|(-\d+$)")


def _plain_int(value, lo: int, hi: int) -> bool:
    return type(value) is int and lo <= value <= hi


def _stated_top_k(entry: dict):
    """Seed 002's top-k fields, in the documented order of precedence."""
    def ok(v):
        return _plain_int(v, 1, 65536)

    if ok(entry.get("n_expert_used")):
        return entry["n_expert_used"]
    sources = entry.get("sources")
    for source in sources if isinstance(sources, list) else []:
        if isinstance(source, dict) and "ffn_moe_topk" in str(source.get("name", "")):
            ne = source.get("ne")
            if isinstance(ne, list) and ne and ok(ne[0]):
                return ne[0]
    for name, i in (("ids_ne", 0), ("dst_ne", 1)):
        ne = entry.get(name)
        if isinstance(ne, list) and len(ne) > (0 if i == 0 else 2) and ok(ne[i]):
            return ne[i]
    return None


def ref_import_llamacpp(root: Path, top_k: int | None) -> RefTrace:
    """The rules of engine/io/llamacpp.py's module docstring, as a slow pure-Python loop."""
    domains = sorted(p.name for p in root.iterdir() if (p / "traces").is_dir())
    if not domains:
        raise Invalid("no domains")
    layer_ids, K = None, top_k
    seq, pos, domain, experts = [], [], [], []
    for s, name in enumerate(domains):
        files = sorted((int(m.group(1)), p) for p in (root / name / "traces").iterdir()
                       if (m := _TRACE_FILE.fullmatch(p.name)))
        if not files:
            raise Invalid(f"{name}: no files")
        n = 0
        for _, path in files:
            try:
                data = json.loads(path.read_bytes())
            except (ValueError, RecursionError) as exc:
                raise Invalid(f"{path}: {type(exc).__name__}") from None
            entries = data.get("entries") if isinstance(data, dict) else None
            if not isinstance(entries, list):
                raise Invalid(f"{path}: no entries list")
            calls = {}
            for e in entries:
                if not isinstance(e, dict) or e.get("operation_type") != "MUL_MAT_ID" or not e.get("expert_ids"):
                    continue
                layer, ids = e.get("layer_id"), e["expert_ids"]
                if not _plain_int(layer, 0, 2**31 - 1):
                    raise Invalid(f"layer_id {layer!r}")
                if not isinstance(ids, list) or not all(_plain_int(v, 0, 65535) for v in ids):
                    raise Invalid(f"expert_ids {ids!r}")
                k = _stated_top_k(e)
                K = k if K is None else K
                if K is None or (k is not None and k != K) or len(ids) % K:
                    raise Invalid(f"top-k {k} / {K}, {len(ids)} ids")
                component = _SUFFIX.sub("", str(e.get("dst_name", "")))
                calls.setdefault(layer, {}).setdefault(component, []).append(
                    [ids[i:i + K] for i in range(0, len(ids), K)])
            if not calls:
                raise Invalid(f"{path}: no routing")
            tokens_per_layer = []
            for layer in sorted(calls):
                first, *others = [calls[layer][c] for c in sorted(calls[layer])]
                if any(other != first for other in others):
                    raise Invalid(f"layer {layer}: components disagree")
                tokens_per_layer.append([tok for call in first for tok in call])
            if len({len(t) for t in tokens_per_layer}) != 1:
                raise Invalid("layers route different numbers of tokens")
            if layer_ids is None:
                layer_ids = sorted(calls)
            elif sorted(calls) != layer_ids:
                raise Invalid("layers differ between files")
            for i in range(len(tokens_per_layer[0])):
                seq.append(s)
                pos.append(n)
                domain.append(name)
                experts.append([t[i] for t in tokens_per_layer])
                n += 1
    experts = np.array(experts, dtype=np.int64)
    refuse_repeated_experts(experts)
    if K > int(experts.max()) + 1:
        raise Invalid("top_k exceeds the number of experts")
    return RefTrace(seq=np.array(seq, np.int64), pos=np.array(pos, np.int32),
                    labels={"domain": np.array(domain, dtype=object)}, experts=experts, layer_ids=layer_ids,
                    n_experts=int(experts.max()) + 1)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.integers(-2, 70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=12)
ENTRY_KEYS = ["layer_id", "expert_ids", "n_expert_used", "operation_type", "dst_name", "sources", "ids_ne", "dst_ne"]


@st.composite
def json_mutation(draw, data: dict) -> bytes:
    """One edit of a parsed trace file, returned as the file's new bytes."""
    entries = data["entries"]
    kind = draw(st.sampled_from(["key", "key", "id", "drop", "duplicate", "entries", "truncate", "bytes", "deep"]))
    i = draw(st.integers(0, len(entries) - 1))
    if kind == "key":
        entries[i][draw(st.sampled_from(ENTRY_KEYS))] = draw(JSON_VALUES)
    elif kind == "id":
        ids = next((e["expert_ids"] for e in entries[i:] + entries if e.get("expert_ids")), None)
        if ids:
            ids[draw(st.integers(0, len(ids) - 1))] = draw(
                st.integers(-(2**65), 2**65) | st.sampled_from([True, 1.0, 1.5, None, "3", [1], 65535, 65536]))
    elif kind == "drop":
        del entries[i]
    elif kind == "duplicate":
        entries.insert(i, json.loads(json.dumps(entries[i])))
    elif kind == "entries":
        data["entries"] = draw(JSON_VALUES)
    text = json.dumps(data).encode()
    if kind == "truncate":
        text = text[:int(len(text) * draw(st.floats(0, 1)))]
    elif kind == "bytes":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=3)) + text[at + 1:]
    elif kind == "deep":
        depth = draw(st.sampled_from([10, 900, 5000, 100000]))
        text = b'{"entries": [' + b"[" * depth + b"]" * depth + b"]}"
    return text


def _llamacpp_case(data, valid: bool) -> None:
    from test_io_llamacpp import make_llamacpp_trace, write_llamacpp_trace

    seed = data.draw(st.integers(0, 2**32 - 1))
    k_field = data.draw(st.sampled_from(["n_expert_used", "sources", "ids_ne", "dst_ne", None]))
    rng = np.random.default_rng(seed)
    trace = make_llamacpp_trace(rng, L=data.draw(st.integers(1, 3)), K=data.draw(st.integers(1, 3)))
    top_k = trace.experts.shape[2] if k_field is None else None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = write_llamacpp_trace(trace, tmp / "src", rng, k_field=k_field,
                                      split_calls=data.draw(st.booleans()), shuffle=data.draw(st.booleans()))
        if not valid:
            files = sorted(source["dir"].glob("*/traces/token-*.json"))
            path = data.draw(st.sampled_from(files))
            path.write_bytes(data.draw(json_mutation(json.loads(path.read_text()))))
        out = tmp / "o.zarr"

        def run():
            return import_llamacpp(source["dir"], out, top_k=top_k, progress=False, chunk_rows=CHUNK)

        def reference():
            return ref_import_llamacpp(source["dir"], top_k)

        if valid:
            store = run()
            assert_store_equals_trace(store, trace)
            assert_store_equals_trace(store, reference())
        else:
            check_outcome(run, out, reference)


# ---------------------------------------------------------------------- Parquet (long format)
_DUCK_INTS = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"}


def ref_import_parquet(path: Path) -> RefTrace:
    """The long format's rules (engine/io/parquet.py's module docstring) over DuckDB's reading, row by row:
    rows in any order, sorted here by (seq, pos, layer, rank)."""
    con = duckdb.connect()
    con.execute("SET threads = 1")
    try:
        if con.execute(f"SELECT count(*) FROM parquet_kv_metadata('{path}') WHERE decode(key) = 'moetrace'"
                       ).fetchone()[0]:
            raise Invalid("has 'moetrace' metadata (not modelled here: only random metadata is generated)")
        types = dict(con.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{path}')").fetchall())
        rel = con.execute(f"SELECT * FROM read_parquet('{path}')")
        names = [d[0] for d in rel.description]
        rows = rel.fetchall()
    except duckdb.Error as exc:
        raise Invalid(f"DuckDB cannot read it: {str(exc).splitlines()[0]}") from None
    required = ["seq", "pos", "layer", "rank", "expert"]
    if any(c not in types for c in required) or any(
            types[c] not in _DUCK_INTS for c in [*required, "token_id"] if c in types):
        raise Invalid(f"columns {types}")
    if ("weight" in types and types["weight"] not in ("FLOAT", "DOUBLE")) or (
            "generated" in types and types["generated"] != "BOOLEAN"):
        raise Invalid(f"types {types}")
    known = {*required, "token_id", "weight", "generated", "token"}
    labels = [n for n in names if n not in known]
    if any(types[n] != "VARCHAR" for n in labels + ["token"] * ("token" in types)):
        raise Invalid(f"non-string extra column {types}")
    if not rows:
        raise Invalid("no rows")
    col = {n: [r[i] for r in rows] for i, n in enumerate(names)}
    if any(v is None for values in col.values() for v in values):
        raise Invalid("null")
    for name, lo, hi in (("layer", 0, 2**31 - 1), ("rank", 0, 65535), ("expert", 0, 65535)):
        if not all(lo <= v <= hi for v in col[name]):
            raise Invalid(f"{name} out of range")
    for name, lo, hi in (("seq", -(2**63), 2**63 - 1), ("pos", *INT32)):
        if not all(lo <= v <= hi for v in col[name]):
            raise Invalid(f"{name} out of range")
    # rows may come in any order: the store order is (seq, pos, layer, rank); each row once
    order = sorted(range(len(rows)), key=lambda i: (col["seq"][i], col["pos"][i], col["layer"][i], col["rank"][i]))
    col = {name: [values[i] for i in order] for name, values in col.items()}
    keys = list(zip(col["seq"], col["pos"], col["layer"], col["rank"]))
    if any(a == b for a, b in zip(keys, keys[1:])):
        raise Invalid("duplicate row")
    layer_ids = sorted(set(col["layer"]))
    K = max(col["rank"]) + 1
    E = max(col["expert"]) + 1
    L, per = len(layer_ids), len(layer_ids) * K
    if len(rows) % per or K > E:
        raise Invalid("incomplete blocks or top_k > n_experts")
    n = len(rows) // per
    want = {"layer": [lid for lid in layer_ids for _ in range(K)] * n, "rank": list(range(K)) * (L * n)}
    if col["layer"] != want["layer"] or col["rank"] != want["rank"]:
        raise Invalid("block order")
    ranges = {"seq": (-(2**63), 2**63 - 1), "pos": INT32, "token_id": (-1, 2**31 - 1)}
    per_token = {}
    for name in [c for c in names if c not in ("layer", "rank", "expert", "weight")]:
        values = col[name]
        heads = values[::per]
        if any(values[i] != heads[i // per] for i in range(len(values))):
            raise Invalid(f"{name} varies within a token")
        if name in ranges and not all(ranges[name][0] <= v <= ranges[name][1] for v in heads):
            raise Invalid(f"{name} out of range")
        per_token[name] = heads
    keys = list(zip(per_token["seq"], per_token["pos"]))
    if any(b <= a for a, b in zip(keys, keys[1:])):
        raise Invalid("tokens not in strictly increasing (seq, pos) order")
    refuse_repeated_experts(np.array(col["expert"], np.int64).reshape(n, L, K))
    weights = None
    if "weight" in col:
        if not all(np.isfinite(w) and abs(w) <= 65504 for w in col["weight"]):
            raise Invalid("weight")
        weights = np.float16(np.float32(col["weight"])).astype(np.float32).reshape(n, L, K)
    return RefTrace(seq=np.array(per_token["seq"], np.int64), pos=np.array(per_token["pos"], np.int32),
                    labels={name: np.array(per_token[name], dtype=object) for name in labels},
                    experts=np.array(col["expert"], np.int64).reshape(n, L, K), layer_ids=layer_ids, n_experts=E,
                    text=np.array(per_token["token"], dtype=object) if "token" in per_token else None,
                    weights=weights)


INT_TYPES = {"seq": [pa.int64()], "pos": [pa.int32(), pa.int64()], "token_id": [pa.int32(), pa.int64()],
             "layer": [pa.int16(), pa.int32(), pa.int64(), pa.uint16()], "rank": [pa.int16(), pa.int8(), pa.uint8()],
             "expert": [pa.int16(), pa.int32(), pa.uint16(), pa.int64()]}


def _fitting_int(values: list) -> pa.DataType | None:
    """int64 or uint64 holding ``values``; None when neither does."""
    lo, hi = min(values), max(values)
    if lo >= -(2**63) and hi < 2**63:
        return pa.int64()
    return pa.uint64() if lo >= 0 and hi < 2**64 else None


@st.composite
def parquet_tables(draw) -> pa.Table:
    """A valid long-format table (in store order or shuffled) with random integer column types."""
    from test_io_parquet import long_table, make_long_trace

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    table = long_table(make_long_trace(rng, n_tokens=draw(st.integers(1, 12))))
    for name, types in INT_TYPES.items():
        target = draw(st.sampled_from(types))
        column = table.column(name)
        if pc_fits(column, target):
            table = table.set_column(table.column_names.index(name), name, column.cast(target))
    if "weight" in table.column_names and draw(st.booleans()):
        i = table.column_names.index("weight")
        table = table.set_column(i, "weight", table.column("weight").cast(pa.float64()))
    if draw(st.booleans()):  # any row order is valid: the importer sorts
        table = table.take(pa.array(draw(st.permutations(list(range(table.num_rows))))))
    return table


def pc_fits(column, target: pa.DataType) -> bool:
    try:
        column.cast(target)
        return True
    except (pa.ArrowInvalid, OverflowError):
        return False


@st.composite
def parquet_mutation(draw, table: pa.Table):
    """One edit: a cell changed or nulled, rows dropped/duplicated/swapped/shuffled, a column dropped or added."""
    kind = draw(st.sampled_from(["cell", "cell", "cell", "null", "drop", "duplicate", "swap", "shuffle", "column",
                                 "extra", "metadata"]))
    n = table.num_rows
    i = draw(st.integers(0, n - 1))
    names = table.column_names
    if kind in ("cell", "null"):
        name = draw(st.sampled_from(names))
        values = table.column(name).to_pylist()
        t = table.column(name).type
        if kind == "null":
            values[i] = None
        elif pa.types.is_integer(t):
            values[i] = draw(st.integers(-(2**63), 2**64 - 1) | st.integers(-2, 70)
                             | st.sampled_from([2**31, 2**15, 40000, 3_000_000_000, 2**63, 65536]))
            info = np.iinfo(t.to_pandas_dtype())
            t = t if info.min <= values[i] <= info.max else _fitting_int(values)
            if t is None:  # no Parquet integer type holds the column: leave it as it was
                return table
        elif pa.types.is_floating(t):
            values[i] = draw(st.floats(allow_nan=True) | st.sampled_from([65504.0, 65520.0, 1e6]))
        elif pa.types.is_boolean(t):
            values[i] = not values[i]
        else:
            values[i] = draw(TEXT)
            t = pa.string()
        table = table.set_column(names.index(name), name, pa.array(values, t))
    elif kind == "drop":
        table = table.take(pa.array([j for j in range(n) if j != i], pa.int64()))  # may be empty
    elif kind == "duplicate":
        table = table.take(pa.array(list(range(i + 1)) + list(range(i, n))))
    elif kind == "swap":
        j = draw(st.integers(0, n - 1))
        order = list(range(n))
        order[i], order[j] = order[j], order[i]
        table = table.take(pa.array(order))
    elif kind == "shuffle":
        table = table.take(pa.array(draw(st.permutations(list(range(n))))))
    elif kind == "column":
        table = table.drop_columns([draw(st.sampled_from(names))])
    elif kind == "extra":
        values = draw(st.sampled_from([pa.array(np.zeros(n)), pa.array(["x"] * n), pa.array(np.arange(n))]))
        table = table.append_column(draw(st.sampled_from(["score", "lang", "token", "generated", "weight", "seq"])),
                                    values)  # a name already present gives duplicate columns
    elif kind == "metadata":
        table = table.replace_schema_metadata({b"moetrace": json.dumps(draw(JSON_VALUES)).encode()})
    return table


def _parquet_case(data, valid: bool) -> None:
    table = data.draw(parquet_tables())
    if not valid:
        table = data.draw(parquet_mutation(table))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = tmp / "in.parquet"
        pq.write_table(table, path, row_group_size=data.draw(st.integers(1, 40)))
        unharmed = None
        if not valid and data.draw(st.integers(0, 9)) == 0:  # bytes cut or changed
            raw = path.read_bytes()
            at = data.draw(st.integers(0, len(raw) - 1))
            flipped = raw[:at] + bytes([raw[at] ^ 0x55]) + raw[at + 1:]
            cut = data.draw(st.booleans())
            if not cut:
                (tmp / "unharmed.parquet").write_bytes(raw)
                unharmed = lambda: ref_import_parquet(tmp / "unharmed.parquet")  # noqa: E731
            path.write_bytes(raw[:at] if cut else flipped)
        out = tmp / "o.zarr"

        def run():
            return import_parquet(path, out, progress=False, chunk_rows=CHUNK, batch_rows=data.draw(st.integers(1, 50)))

        def reference():
            return ref_import_parquet(path)

        if valid:
            must_import(run, reference)
        else:
            check_outcome(run, out, reference, unharmed)


# ---------------------------------------------------------------------- the tests
CASES = {"csv": _csv_case, "llamacpp": _llamacpp_case, "parquet": _parquet_case}


@pytest.mark.parametrize("valid", [True, False], ids=["valid", "malformed"])
@pytest.mark.parametrize("fmt", list(CASES))
@FAST
@given(data=st.data())
def test_fuzz(fmt, valid, data):
    CASES[fmt](data, valid)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(CASES))
@SLOW
@given(data=st.data(), valid=st.booleans())
def test_fuzz_many(fmt, data, valid):
    CASES[fmt](data, valid)


def test_every_byte_of_a_column_chunk_flipped(tmp_path):
    """Each byte of the first column chunk (its dictionary and data page headers included) flipped
    in turn. Found by ``test_fuzz_many[parquet]``: a flipped page-header byte made pyarrow end the
    batches early without an error, and the import wrote an empty store."""
    from test_io_parquet import long_table, make_long_trace

    table = long_table(make_long_trace(np.random.default_rng(3), n_tokens=3, L=3, K=2, weights=False, n_labels=0,
                                       text=True))
    original = tmp_path / "original.parquet"
    pq.write_table(table, original)
    raw = original.read_bytes()
    first = pq.ParquetFile(original).metadata.row_group(0).column(0)
    start = first.dictionary_page_offset or first.data_page_offset
    for at in range(start, start + first.total_compressed_size):
        path = tmp_path / f"flipped-{at}.parquet"
        path.write_bytes(raw[:at] + bytes([raw[at] ^ 0x55]) + raw[at + 1:])
        out = tmp_path / f"o-{at}.zarr"
        try:
            check_outcome(lambda: import_parquet(path, out, progress=False, chunk_rows=CHUNK), out,
                          lambda: ref_import_parquet(path), lambda: ref_import_parquet(original))
        except AssertionError as exc:
            raise AssertionError(f"byte {at} flipped: {exc}") from exc
