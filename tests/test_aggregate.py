"""moetrace.counting: counts from a trace store against DuckDB SQL and a pandas transcription of seed 000."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetrace import counting as A
from moetrace.cli import main as cli_main
from moetrace.errors import MoetraceError
from moetrace.kernels.counting import STATS as REGISTRY
from moetrace.store import TraceStore
from routes import random_topk

DOMAINS = ["bio", "math", "law"]
LANGS = ["en", "fr"]


def make_trace(rng, n_seq, L, K, E, shared=2):
    """Rows in store order: contiguous sequences, a shared token prefix, some pos gaps."""
    lengths = rng.integers(shared + 2, shared + 9, n_seq)
    seq = np.repeat(rng.permutation(np.arange(100, 100 + n_seq)), lengths).astype(np.int64)
    pos = []
    for length in lengths:
        steps = np.where(rng.random(length) < 0.85, 1, 2)  # occasional gaps break temporal pairs
        steps[: shared + 1] = 1
        pos.append(np.cumsum(steps) - 1)
    pos = np.concatenate(pos).astype(np.int32)
    n = len(seq)
    token_id = rng.integers(0, 5, n).astype(np.int32)
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    for i in range(shared):
        token_id[first + i] = 40 + i
    # a later shifted index that all sequences share, with differing tokens before it
    token_id[first + shared + 1] = 77
    dom = np.repeat(rng.choice(DOMAINS, n_seq), lengths)
    lang = np.repeat(rng.choice(LANGS, n_seq), lengths)
    experts = np.argsort(rng.random((n, L, E)), axis=-1)[:, :, :K].astype(np.uint8)
    return {
        "seq": seq, "pos": pos, "token_id": token_id, "generated": rng.random(n) < 0.6,
        "domain": dom, "lang": lang, "experts": experts,
        "weights": rng.random((n, L, K)).astype(np.float16),
    }


def write_store(path, trace, L, K, E, chunk_rows, layer_ids=None, weights=True):
    with TraceStore.create(path, n_layers=L, n_experts=E, top_k=K, labels={"domain": DOMAINS, "lang": LANGS},
                           layer_ids=layer_ids, weights=weights, chunk_rows=chunk_rows, model="toy") as st:
        data = dict(trace)
        if not weights:
            data.pop("weights")
        st.append(data)
    return path


def r_last_shared_tok(seq, pos, token):
    """Pandas transcription of seed 000's R code for ``last_shared_tok``."""
    df = pd.DataFrame({"q_ix": seq, "token_ix": pos, "token": token})
    df = df.sort_values(["q_ix", "token_ix"], kind="stable")
    df["shifted_token_ix"] = df.groupby("q_ix").cumcount() + 1
    counts = df.groupby(["shifted_token_ix", "token"]).size().rename("n").reset_index()
    hits = counts[counts["n"] == df["q_ix"].nunique()]["shifted_token_ix"]
    last = hits.max() if len(hits) else -np.inf  # R: max of nothing is -Inf
    keep = (df["shifted_token_ix"] > last).reindex(range(len(seq))).to_numpy()
    return (0 if last == -np.inf else int(last)), keep


def keep_mask(trace, skip_shared_prefix, generated_only, positions, groups, where=None):
    keep = np.ones(len(trace["seq"]), dtype=bool)
    for column, values in (where or {}).items():
        keep &= np.isin(trace[column], values)
    if skip_shared_prefix:
        keep &= r_last_shared_tok(trace["seq"], trace["pos"], trace["token_id"])[1]
    if generated_only:
        keep &= trace["generated"]
    if positions:
        keep &= (trace["pos"] >= positions[0]) & (trace["pos"] < positions[1])
    for label, values in (groups or {}).items():
        keep &= np.isin(trace[label], values)
    return keep


def sql_counts(trace, keep, layer_ids, by):
    """DuckDB reference: {stat: {(group..., layer, a, b): count}} over the long routing table."""
    n, L, K = trace["experts"].shape
    rows = np.repeat(np.arange(n), L * K)
    r = pd.DataFrame({
        "row": rows, "seq": trace["seq"][rows], "pos": trace["pos"][rows].astype(np.int64),
        "keep": keep[rows], "domain": trace["domain"][rows], "lang": trace["lang"][rows],
        "li": np.tile(np.repeat(np.arange(L), K), n), "layer": np.tile(np.repeat(layer_ids, K), n),
        "rank": np.tile(np.arange(K), n * L), "expert": trace["experts"].reshape(-1).astype(np.int64),
        "weight": trace["weights"].reshape(-1).astype(np.float64),
    })
    con = duckdb.connect()
    con.register("r", r)
    g = "".join(f"a.{b}, " for b in by)
    queries = {
        "experts": f"SELECT {g} a.layer, a.rank, a.expert, count(*) FROM r a WHERE a.keep GROUP BY ALL",
        "paths": f"""SELECT {g} b.layer, a.expert, b.expert, count(*) FROM r a JOIN r b
                     ON a.row = b.row AND b.li = a.li + 1 AND a.rank = 0 AND b.rank = 0
                     WHERE a.keep GROUP BY ALL""",
        "pairs": f"""SELECT {g} a.layer, a.expert, b.expert, count(*) FROM r a JOIN r b
                     ON a.row = b.row AND a.li = b.li AND a.rank = 0 AND b.rank = 1
                     WHERE a.keep GROUP BY ALL""",
        "temporal": f"""SELECT {g} a.layer, a.expert, b.expert, count(*) FROM r a JOIN r b
                        ON b.row = a.row + 1 AND a.seq = b.seq AND b.pos = a.pos + 1 AND a.li = b.li
                        AND a.rank = 0 AND b.rank = 0 WHERE a.keep AND b.keep GROUP BY ALL""",
        "coact": """SELECT a.layer, a.expert, b.expert, count(*) FROM r a JOIN r b
                    ON a.row = b.row AND a.li = b.li WHERE a.keep GROUP BY ALL""",
        "weight_sum": f"SELECT {g} a.layer, a.expert, sum(a.weight) FROM r a WHERE a.keep GROUP BY ALL",
        "tokens": f"SELECT {g} count(DISTINCT a.row) FROM r a WHERE a.keep GROUP BY ALL",
    }
    out = {}
    for name, q in queries.items():
        res = con.execute(q).fetchall()
        out[name] = {tuple(row[:-1]): row[-1] for row in res}
    return out


def nonzero(da):
    if not da.dims:
        return {(): da.item()} if da.item() else {}
    s = da.to_series()
    s = s[s != 0]
    return {(k if isinstance(k, tuple) else (k,)): v for k, v in s.items()}


def assert_counts_equal(ds, want):
    for name, ref in want.items():
        got = nonzero(ds[name])
        if name == "weight_sum":
            assert got.keys() == ref.keys(), name
            np.testing.assert_allclose([got[k] for k in ref], [ref[k] for k in ref], rtol=1e-9)
        else:
            assert got == ref, name


STATS = ["experts", "paths", "pairs", "temporal", "coact", "weight_sum"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_seq=st.integers(2, 7),
    L=st.integers(1, 3),
    K=st.integers(2, 3),
    extra_e=st.integers(0, 3),
    chunk_rows=st.sampled_from([4, 16, 64]),
    by=st.sampled_from([[], ["domain"], ["lang", "domain"], ["domain", "lang"]]),
    skip=st.booleans(),
    generated_only=st.booleans(),
    positions=st.sampled_from([None, (1, 6), (3, 100)]),
    groups=st.sampled_from([None, {"domain": ["math", "bio"]}, {"lang": ["fr"]}]),
    where=st.sampled_from([None, {"token_id": [0, 1, 77]}, {"domain": ["law", "bio"], "generated": [True]}]),
)
def test_counts_equal_duckdb(seed, n_seq, L, K, extra_e, chunk_rows, by, skip, generated_only, positions, groups,
                             where):
    rng = np.random.default_rng(seed)
    E = K + extra_e
    trace = make_trace(rng, n_seq, L, K, E)
    layer_ids = sorted(rng.choice(np.arange(10), L, replace=False).tolist())
    keep = keep_mask(trace, skip, generated_only, positions, groups, where)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_store(Path(tmp) / "s.zarr", trace, L, K, E, chunk_rows, layer_ids)
        args = dict(stats=STATS if L > 1 else [s for s in STATS if s != "paths"], by=by,
                    where=where, skip_shared_prefix=skip, generated_only=generated_only, positions=positions,
                    groups=groups, progress=False)
        if not keep.any():
            with pytest.raises(MoetraceError, match="empty selection"):
                A.count(path, **args)
            return
        ds = A.count(path, **args)
    want = sql_counts(trace, keep, np.array(layer_ids), by)
    if L == 1:
        want.pop("paths")
    assert_counts_equal(ds, want)
    assert list(ds["layer"].values) == layer_ids
    assert ds["experts"].dims == (*by, "layer", "rank", "expert")
    assert ds["coact"].dims == ("layer", "expert", "other_expert")
    for label, values in (groups or {}).items():
        if label in by:
            assert list(ds[label].values) == values
    if skip:
        assert ds.attrs["shared_prefix_tokens"] == r_last_shared_tok(trace["seq"], trace["pos"], trace["token_id"])[0]


def test_chunking_never_changes_a_count(tmp_path):
    rng = np.random.default_rng(11)
    L, K, E = 3, 2, 6
    trace = make_trace(rng, 6, L, K, E)
    n = len(trace["seq"])
    args = dict(stats=STATS, by=["domain", "lang"], skip_shared_prefix=True, progress=False)
    results = []
    for n_chunks in (1, 2, 4):
        path = write_store(tmp_path / f"s{n_chunks}.zarr", trace, L, K, E, chunk_rows=-(-n // n_chunks))
        results.append(A.count(path, **args))
    for ds in results[1:]:
        for name in results[0].data_vars:
            np.testing.assert_array_equal(ds[name].values, results[0][name].values, err_msg=name)
    # count_range pieces (cut inside chunks and inside sequences) sum exactly to the whole
    path = tmp_path / "s4.zarr"
    cuts = [0, 1, n // 3, n // 3 + 1, n - 2, n]
    pieces = [A.count_range(path, a, b, **args) for a, b in zip(cuts[:-1], cuts[1:])]
    total = pieces[0]
    for piece in pieces[1:]:
        total = total + piece
    for name in results[0].data_vars:
        np.testing.assert_allclose(total[name].values, results[0][name].values, err_msg=name)
    assert int(results[0]["temporal"].sum()) > 0


def test_temporal_across_chunk_boundaries(tmp_path):
    """One long sequence split into 1-row chunks: every transition still counted."""
    L, K, E, n = 2, 2, 4, 9
    rng = np.random.default_rng(5)
    experts = np.argsort(rng.random((n, L, E)), axis=-1)[:, :, :K].astype(np.uint8)
    trace = {"seq": np.zeros(n, np.int64), "pos": np.arange(n, dtype=np.int32), "experts": experts,
             "domain": np.array(["bio"] * n), "lang": np.array(["en"] * n)}
    with TraceStore.create(tmp_path / "t.zarr", n_layers=L, n_experts=E, top_k=K,
                           labels={"domain": DOMAINS, "lang": LANGS}, chunk_rows=1) as st:
        st.append(trace)
    ds = A.count(tmp_path / "t.zarr", stats=["temporal"], progress=False)
    want = np.zeros((L, E, E), np.int64)
    for t in range(n - 1):
        for l in range(L):
            want[l, experts[t, l, 0], experts[t + 1, l, 0]] += 1
    np.testing.assert_array_equal(ds["temporal"].values, want)


def test_shared_prefix_matches_r_transcription(tmp_path):
    """Sequences in any id order (each one's rows contiguous, in pos order: the store invariant)."""
    rng = np.random.default_rng(7)
    for trial in range(5):
        trace = make_trace(rng, 5, 1, 1, 2, shared=int(rng.integers(0, 3)))
        if trial == 4:
            trace["token_id"][:] = rng.integers(0, 3, len(trace["seq"]))  # (almost surely) nothing shared
        path = write_store(tmp_path / f"p{trial}.zarr", trace, 1, 1, 2, chunk_rows=4, weights=False)
        last, seq_ids, cutoff = A.shared_prefix(path)
        want_last, want_keep = r_last_shared_tok(trace["seq"], trace["pos"], trace["token_id"])
        assert last == want_last
        idx = np.searchsorted(seq_ids, trace["seq"])
        np.testing.assert_array_equal(trace["pos"] > cutoff[idx], want_keep)


@pytest.mark.parametrize("chunk_rows", [3, 64])
def test_shared_prefix_refuses_rows_out_of_sequence_order(tmp_path, chunk_rows):
    """A store breaking the invariant gets a one-line error, not a wrong prefix."""
    rng = np.random.default_rng(17)
    trace = make_trace(rng, 4, 1, 1, 2)
    n = len(trace["seq"])
    swapped = np.arange(n)
    swapped[[1, 2]] = swapped[[2, 1]]  # two rows of the first sequence out of pos order
    interleaved = np.r_[np.arange(1, n), 0]  # the first sequence's first row moved to the end
    for name, order in (("swapped", swapped), ("interleaved", interleaved)):
        rows = {k: v[order] for k, v in trace.items()}
        with pytest.raises(MoetraceError, match="contiguous|increasing pos|order"):
            # the store itself may refuse such rows; if it takes them, shared_prefix refuses
            path = write_store(tmp_path / f"{name}{chunk_rows}.zarr", rows, 1, 1, 2, chunk_rows=chunk_rows,
                               weights=False)
            A.shared_prefix(path)


def test_shared_prefix_by_token_text(tmp_path):
    """A store without token ids (e.g. imported from seed 000's CSV) compares token text, like the R code."""
    rng = np.random.default_rng(8)
    trace = make_trace(rng, 4, 1, 1, 2, shared=3)
    text = np.array([f"t{t}" for t in trace["token_id"]])
    with TraceStore.create(tmp_path / "x.zarr", n_layers=1, n_experts=2, top_k=1, token_text=True,
                           labels={"domain": DOMAINS, "lang": LANGS}, chunk_rows=8) as st:
        st.append({**{k: v for k, v in trace.items() if k not in ("token_id", "weights")}, "text": text})
    last, _, _ = A.shared_prefix(tmp_path / "x.zarr")
    assert last == r_last_shared_tok(trace["seq"], trace["pos"], text)[0] == 5  # 0..2 and the 77 at index 5


def coverage_reference(trace, keep, table, kind, by):
    """Pandas transcription of seed 000's "Analyze proportions to be ablated" blocks."""
    ex = trace["experts"].astype(int)
    n, L, _ = ex.shape
    rows = []
    for r in np.flatnonzero(keep):
        if kind == "paths":
            hits = [table[l, ex[r, l - 1, 0], ex[r, l, 0]] for l in range(1, L)]
        elif kind == "experts":
            hits = [table[l, ex[r, l, 0]] for l in range(L)]
        else:
            hits = [table[l, ex[r, l, 0], ex[r, l, 1]] for l in range(L)]
        rows.append({"q_ix": trace["seq"][r], "domain": trace["domain"][r], "lang": trace["lang"][r],
                     "n_spec": int(sum(hits)), "n_possible": len(hits)})
    df = pd.DataFrame(rows)
    df["any"] = df["n_spec"] > 0
    df["half"] = df["n_spec"] >= df["n_possible"] * 0.5
    out = df.groupby(by).agg(n_questions=("q_ix", "nunique"), n_toks=("q_ix", "size"),
                             n_toks_with_any=("any", "sum"), n_toks_with_half=("half", "sum"),
                             n_targeted=("n_spec", "sum"), n_possible=("n_possible", "sum"))
    out["prop_targeted"] = out["n_targeted"] / out["n_possible"]
    out["prop_toks_with_any"] = out["n_toks_with_any"] / out["n_toks"]
    out["prop_toks_with_half"] = out["n_toks_with_half"] / out["n_toks"]
    return out


class TableTargets:
    """Test fixture with the three table methods of moetrace.targets.Targets."""

    def __init__(self, experts, paths, pairs):
        self.tables = {"experts": experts, "paths": paths, "pairs": pairs}

    def expert_table(self, layer_ids, n_experts):
        return self.tables["experts"]

    def path_table(self, layer_ids, n_experts):
        return self.tables["paths"]

    def pair_table(self, layer_ids, n_experts):
        return self.tables["pairs"]


def test_coverage_matches_seed_000_transcription(tmp_path):
    rng = np.random.default_rng(9)
    L, K, E = 4, 2, 5
    trace = make_trace(rng, 8, L, K, E)
    path = write_store(tmp_path / "c.zarr", trace, L, K, E, chunk_rows=7)
    targets = TableTargets(rng.random((L, E)) < 0.3, rng.random((L, E, E)) < 0.3, rng.random((L, E, E)) < 0.3)
    keep = keep_mask(trace, True, False, None, None)
    for kind in ("paths", "experts", "pairs"):
        ds = A.coverage(path, targets, by=["domain", "lang"], kind=kind, skip_shared_prefix=True, progress=False)
        want = coverage_reference(trace, keep, targets.tables[kind], kind, ["domain", "lang"])
        for (dom, lang), row in want.iterrows():
            got = ds.sel(domain=dom, lang=lang)
            for col in want.columns:
                np.testing.assert_allclose(float(got[col]), row[col], err_msg=f"{kind} {col}")
        assert int(ds["n_toks"].sum()) == keep.sum()


def test_coverage_with_engine_targets(tmp_path):
    """The real Targets object gives the same tables, hence the same coverage, as the fixture."""
    Targets = pytest.importorskip("moetrace.targets").Targets
    rng = np.random.default_rng(10)
    L, K, E = 3, 2, 4
    trace = make_trace(rng, 5, L, K, E)
    path = write_store(tmp_path / "t.zarr", trace, L, K, E, chunk_rows=9, layer_ids=[1, 4, 6])
    targets = Targets(paths={4: [[2, 3], [0, 1]], 6: [[1, 1]]}, experts={1: [1], 6: [0, 2]}, pairs={4: [[0, 1]]})
    paths = np.zeros((L, E, E), bool)
    paths[1, 2, 3] = paths[1, 0, 1] = paths[2, 1, 1] = True
    experts = np.zeros((L, E), bool)
    experts[0, 1] = experts[2, 0] = experts[2, 2] = True
    pairs = np.zeros((L, E, E), bool)
    pairs[1, 0, 1] = True
    fixture = TableTargets(experts, paths, pairs)
    for kind in ("paths", "experts", "pairs"):
        got = A.coverage(path, targets, by=["lang"], kind=kind, progress=False)
        want = A.coverage(path, fixture, by=["lang"], kind=kind, progress=False)
        xr.testing.assert_identical(got, want)
        assert int(got["n_targeted"].sum()) > 0


def test_save_load_cli_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    trace = make_trace(rng, 4, 2, 2, 4)
    path = write_store(tmp_path / "s.zarr", trace, 2, 2, 4, chunk_rows=5)
    out = tmp_path / "counts.zarr"
    code = cli_main(["count", str(path), str(out), "--stats", "experts,paths,pairs,temporal,coact",
                     "--by", "domain,lang", "--skip-shared-prefix", "--positions", "0:50", "--quiet"])
    assert code == 0
    ds = xr.open_zarr(out)
    direct = A.count(path, stats=["experts", "paths", "pairs", "temporal", "coact"], by=["domain", "lang"],
                     skip_shared_prefix=True, positions=(0, 50), progress=False)
    for name in direct.data_vars:
        np.testing.assert_array_equal(ds[name].values, direct[name].values)
    assert list(ds["domain"].values) == DOMAINS
    loaded = A.load_counts(out)
    assert loaded.attrs["moetrace_counts_version"] == 1 and loaded.attrs["shared_prefix_tokens"] >= 1
    assert json.loads(loaded.attrs["filters"])["positions"] == [0, 50]
    assert cli_main(["count", str(path), str(out), "--quiet"]) == 2  # exists, no --overwrite
    assert cli_main(["count", str(path), str(out), "--by", "domain", "--group", "domain=math,bio",
                     "--generated-only", "--overwrite", "--quiet"]) == 0
    ds = A.load_counts(out)
    assert list(ds["domain"].values) == ["math", "bio"]
    keep = trace["generated"] & np.isin(trace["domain"], ["math", "bio"])
    assert int(ds["tokens"].sum()) == keep.sum()
    assert cli_main(["count", str(path), str(out), "--stats", "experts,bogus", "--overwrite", "--quiet"]) == 2


def test_errors(tmp_path):
    rng = np.random.default_rng(4)
    trace = make_trace(rng, 3, 2, 2, 4)
    path = write_store(tmp_path / "s.zarr", trace, 2, 2, 4, chunk_rows=8, weights=False)
    with pytest.raises(MoetraceError, match="unknown label 'topic'"):
        A.count(path, by=["topic"], progress=False)
    with pytest.raises(MoetraceError, match="unknown statistic 'expert'"):
        A.count(path, stats=["expert"], progress=False)
    with pytest.raises(MoetraceError, match="empty selection"):
        A.count(path, positions=(1000, 2000), progress=False)
    with pytest.raises(MoetraceError, match="'chem' is not a domain"):
        A.count(path, groups={"domain": ["chem"]}, progress=False)
    with pytest.raises(MoetraceError, match="routing/weights"):
        A.count(path, stats=["weight_sum"], progress=False)
    with pytest.raises(MoetraceError, match="vocab_size"):
        A.count(path, stats=["vocab"], progress=False)
    ds = A.count(path, progress=False)
    ds.attrs["moetrace_counts_version"] = 99
    ds.to_zarr(tmp_path / "v99.zarr", mode="w", consolidated=False)
    with pytest.raises(MoetraceError, match="version 99"):
        A.load_counts(tmp_path / "v99.zarr")
    with pytest.raises(MoetraceError, match="a trace store, not a counts file; count it first: `moetrace count"):
        A.load_counts(path)
    with pytest.raises(MoetraceError, match="not a counts file|no such"):
        A.load_counts(tmp_path / "missing.zarr")


def test_vocab_counts(tmp_path):
    rng = np.random.default_rng(6)
    trace = make_trace(rng, 4, 2, 2, 4)
    trace["token_id"][::5] = -1
    path = write_store(tmp_path / "v.zarr", trace, 2, 2, 4, chunk_rows=6)
    ds = A.count(path, stats=["vocab"], vocab_size=80, progress=False)
    want = np.zeros((80, 2, 4), np.int64)
    for r in range(len(trace["seq"])):
        if trace["token_id"][r] >= 0:
            for l in range(2):
                for e in trace["experts"][r, l]:
                    want[trace["token_id"][r], l, e] += 1
    np.testing.assert_array_equal(ds["vocab"].values, want)
    assert ds["vocab"].dims == ("token_id", "layer", "expert")


@pytest.mark.parametrize("call", [
    dict(where={"domain": 5}),
    dict(where={"domain": None}),
    dict(where={"domain": []}),
    dict(where={"pos": "3"}),
    dict(where={"pos": 1.5}),
    dict(where={"generated": 1}),
    dict(where={"nope": [1]}),
    dict(where={5: [1]}),
    dict(where=["domain"]),
    dict(where="domain"),
    dict(by=5),
    dict(by=["domain", 5]),
    dict(by=["domain", "domain"]),
    dict(by=["topic"]),
    dict(stats=5),
    dict(stats=["experts", 3]),
    dict(stats=[["experts"]]),
    dict(stats="experts,nope"),
    dict(groups={"domain": 5}),
    dict(groups=["domain"]),
    dict(groups={"topic": ["a"]}),
    dict(positions=(1,)),
    dict(positions="1:5"),
    dict(positions=(1.5, 3)),
    dict(positions=(5, 1)),
    dict(skip_shared_prefix="yes"),
    dict(generated_only=1),
    dict(stats=["vocab"], vocab_size="10"),
    dict(stats=["vocab"], vocab_size=0),
    dict(stats=["pairs"]),  # the store below has top_k=1
    dict(stats=["weight_sum"]),  # ... and no routing/weights
    dict(skip_shared_prefx=True),  # a typo
])
def test_every_bad_argument_is_a_one_line_error(tmp_path_factory, call):
    """issue 9: no TypeError/KeyError traceback from count's arguments, a one-line MoetraceError."""
    path = tmp_path_factory.getbasetemp() / "bad_args.zarr"
    if not path.exists():
        rng = np.random.default_rng(5)
        write_store(path, make_trace(rng, 3, 2, 1, 4), 2, 1, 4, chunk_rows=8, weights=False)
    for fn in (A.count, lambda p, **kw: A.count_range(p, 0, 5, **kw)):
        with pytest.raises(MoetraceError) as info:
            fn(path, progress=False, **call)
        assert "\n" not in str(info.value)
    if set(call) <= {"where", "by", "groups", "positions", "skip_shared_prefix", "generated_only"}:
        with pytest.raises(MoetraceError):
            A.coverage(path, TableTargets(None, np.zeros((2, 4, 4), bool), None), progress=False, **call)


def test_filters_object_equals_keywords(tmp_path):
    rng = np.random.default_rng(21)
    trace = make_trace(rng, 5, 2, 2, 4)
    path = write_store(tmp_path / "f.zarr", trace, 2, 2, 4, chunk_rows=8)
    filters = A.Filters(by=("domain",), skip_shared_prefix=True, positions=(1, 50), where={"lang": "en"})
    a = A.count(path, stats=["experts", "temporal"], filters=filters, progress=False)
    b = A.count(path, stats=["experts", "temporal"], by=["domain"], skip_shared_prefix=True, positions=(1, 50),
                where={"lang": "en"}, progress=False)
    xr.testing.assert_identical(a, b)


_SAVE_SCRIPT = """
import sys, numpy as np, xarray as xr
from moetrace.counting import save_counts
n = int(sys.argv[2])
ds = xr.Dataset({f"v{i}": (("layer", "expert"), np.full((4, 8), i, np.int64)) for i in range(n)},
                attrs={"moetrace_counts_version": 1})
print("start", flush=True)
save_counts(ds, sys.argv[1], overwrite=True)
print("done", flush=True)
"""


def test_save_counts_killed_mid_write_keeps_the_old_file(tmp_path):
    """SIGKILL while save_counts writes: OUT still loads as the old file; the partial one is refused."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "counts.zarr"
    env = dict(os.environ)
    subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(out), "2"], check=True, env=env)
    old = A.load_counts(out)
    assert sorted(old.data_vars) == ["v0", "v1"]
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_SCRIPT, str(out), "400"], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "start"
        deadline = time.monotonic() + 120
        partial = []
        while not partial and time.monotonic() < deadline:
            partial = [p for p in tmp_path.glob("counts.zarr.partial-*") if any(p.glob("v*"))]
            time.sleep(0.005)
        assert partial, "the writer never started its staging file"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    xr.testing.assert_identical(A.load_counts(out), old)
    with pytest.raises(MoetraceError, match="incomplete counts file"):
        A.load_counts(partial[0])


def test_load_counts_refuses_a_file_without_the_completion_mark(tmp_path):
    rng = np.random.default_rng(22)
    path = write_store(tmp_path / "s.zarr", make_trace(rng, 3, 2, 2, 4), 2, 2, 4, chunk_rows=8)
    ds = A.count(path, progress=False)
    ds.to_zarr(tmp_path / "raw.zarr", mode="w", consolidated=True)  # written without save_counts
    with pytest.raises(MoetraceError, match="incomplete counts file"):
        A.load_counts(tmp_path / "raw.zarr")
    A.save_counts(ds, tmp_path / "ok.zarr")
    xr.testing.assert_identical(A.load_counts(tmp_path / "ok.zarr"), ds)
    assert not list(tmp_path.glob("ok.zarr.*"))  # nothing left beside it
    A.save_counts(ds.isel(layer=[0]), tmp_path / "ok.zarr", overwrite=True)
    assert A.load_counts(tmp_path / "ok.zarr").sizes["layer"] == 1
    assert not list(tmp_path.glob("ok.zarr.*"))


@pytest.mark.parametrize("layout", [{}, {"shard_chunks": 2}, {"codec": {"cname": "zstd", "clevel": 1,
                                                                        "shuffle": "noshuffle"}}])
def test_count_chunk_reader_equals_zarr(tmp_path, layout):
    """The raw chunk reader (plain layout) and its zarr fallback (shards) give zarr's own arrays,
    including chunks zarr never wrote because they are all fill value."""
    from moetrace.counting.chunks import ChunkReader

    rng = np.random.default_rng(23)
    trace = make_trace(rng, 6, 2, 2, 4)
    trace["generated"][:10] = False  # chunks 0-1 of `generated` are all fill value: no chunk file
    n = len(trace["seq"])
    with TraceStore.create(tmp_path / "r.zarr", n_layers=2, n_experts=4, top_k=2, chunk_rows=5, weights=True,
                           labels={"domain": DOMAINS, "lang": LANGS}, **layout) as st:
        st.append(trace)
    st = TraceStore.open(tmp_path / "r.zarr")
    cols = ["experts", "weights", "seq", "pos", "generated", "domain", "token_id"]
    for a, b in [(0, n), (3, n - 2), (7, 8)]:
        want = list(st.iter_chunks(cols, rows=(a, b), prefetch=False))
        reader = ChunkReader(st, cols, (a, b))
        buffers = reader.buffers()
        seen = 0
        for index, w in zip(reader.indices, want):  # buffers are reused: compare as we go
            g = reader.load(index, buffers)
            seen += 1
            assert (g.start, g.stop) == (w.start, w.stop)
            for col in cols:
                np.testing.assert_array_equal(g[col], w[col], err_msg=col)
        assert seen == len(want)
    ds = A.count(st, stats=["experts", "temporal", "weight_sum"], by=["domain"], generated_only=True,
                 progress=False)
    keep = trace["generated"]
    assert int(ds["tokens"].sum()) == keep.sum()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), chunk_rows=st.sampled_from([3, 7, 16, 1000]), n_cuts=st.integers(1, 5))
def test_any_split_into_count_ranges_adds_up(seed, chunk_rows, n_cuts):
    """Every registered statistic: counts of any split into count_ranges sum to count, whatever the chunking."""
    rng = np.random.default_rng(seed)
    L, K, E = 3, 2, 5
    trace = make_trace(rng, 5, L, K, E)
    n = len(trace["seq"])
    stats = [s for s in REGISTRY if s != "tokens"]
    args = dict(stats=stats, by=["lang", "domain"], skip_shared_prefix=True, vocab_size=100, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_store(Path(tmp) / "s.zarr", trace, L, K, E, chunk_rows=chunk_rows)
        whole = A.count(path, **args)
        cuts = sorted({0, n, *rng.integers(0, n + 1, n_cuts).tolist()})
        total = None
        for a, b in zip(cuts[:-1], cuts[1:]):
            piece = A.count_range(path, a, b, **args)
            total = piece if total is None else total + piece
    for name in whole.data_vars:
        np.testing.assert_allclose(total[name].values, whole[name].values, rtol=1e-12, err_msg=name)


def test_shared_prefix_memory_is_bounded_by_chunks_not_tokens(tmp_path):
    """issue 9: the prefix passes stream chunks; peak memory stays far below one int64 per token."""
    import tracemalloc

    n_seq, seq_len, chunk_rows = 1500, 200, 4096
    n = n_seq * seq_len
    seq = np.repeat(np.arange(n_seq, dtype=np.int64), seq_len)
    pos = np.tile(np.arange(seq_len, dtype=np.int32), n_seq)
    token_id = np.tile(np.arange(seq_len, dtype=np.int32) % 50, n_seq)
    token_id[pos >= 7] = (np.arange(n)[pos >= 7] % 13).astype(np.int32)  # shared: the first 7 tokens
    with TraceStore.create(tmp_path / "m.zarr", n_layers=1, n_experts=2, top_k=1, chunk_rows=chunk_rows) as st:
        st.append({"seq": seq, "pos": pos, "token_id": token_id, "experts": np.zeros((n, 1, 1), np.uint8)})
    tracemalloc.start()
    last, seq_ids, cutoff = A.shared_prefix(tmp_path / "m.zarr")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert last == 7 and len(seq_ids) == n_seq and (cutoff == 6).all()
    # measured: 2.3 bytes/token here (chunk buffers + 16 bytes per sequence); the old in-memory
    # pass peaked at 90 bytes/token on this store
    assert peak < 8 * n, f"peak {peak} bytes for {n} tokens"


def test_a_damaged_chunk_is_a_one_line_error_in_count(tmp_path):
    """The direct chunk reader names the damaged file instead of a numcodecs traceback, and a frame
    that decodes to another size is refused (it would leave stale rows in the reused buffer)."""
    from numcodecs import blosc

    from moetrace.errors import MoetraceError
    from moetrace.store import TraceStore

    path = tmp_path / "t.zarr"
    with TraceStore.create(path, n_layers=2, n_experts=8, top_k=2, chunk_rows=64) as st:
        st.append({"seq": np.repeat(np.arange(4), 50), "pos": np.tile(np.arange(50), 4),
                   "experts": random_topk(np.random.default_rng(0), 200, 2, 2, 8)})
    chunk = next(p for p in (path / "routing" / "experts").rglob("*") if p.is_file() and p.name != "zarr.json")
    good = chunk.read_bytes()
    chunk.write_bytes(good[:20])
    with pytest.raises(MoetraceError, match="damaged chunk"):
        A.count(path, stats=["experts"], progress=False)
    chunk.write_bytes(blosc.compress(b"\0" * 10, b"lz4", 5, blosc.BITSHUFFLE))  # a valid frame, too short
    with pytest.raises(MoetraceError, match=r"damaged chunk \(the frame decodes to 10 bytes"):
        A.count(path, stats=["experts"], progress=False)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), chunk_rows=st.sampled_from([1, 2, 3, 7, 16]), workers=st.integers(1, 5),
       by=st.sampled_from([[], ["domain"], ["lang", "domain"]]), skip=st.booleans())
def test_workers_and_chunk_seams_do_not_change_counts(seed, chunk_rows, workers, by, skip):
    """The count driver's workers take chunks in any order, and ``temporal`` counts the transitions
    across chunk seams afterwards: every statistic, over any row range, equals the same trace
    counted from one chunk (no seams at all) by one worker."""
    from moetrace.counting.driver import count_store
    from moetrace.counting.filters import Filters

    rng = np.random.default_rng(seed)
    L, K, E = 3, 2, 5
    trace = make_trace(rng, 6, L, K, E)
    n = len(trace["seq"])
    stats = [s for s in REGISTRY if s != "tokens"]
    a, b = sorted(rng.integers(0, n + 1, 2).tolist())
    filters = Filters.of(None, by=by or None, skip_shared_prefix=skip)
    with tempfile.TemporaryDirectory() as tmp:
        chunked = TraceStore.open(write_store(Path(tmp) / "c.zarr", trace, L, K, E, chunk_rows=chunk_rows))
        whole = TraceStore.open(write_store(Path(tmp) / "w.zarr", trace, L, K, E, chunk_rows=n))
        got = count_store(chunked, a, b, stats, filters, 100, False, allow_empty=True, workers=workers)
        want = count_store(whole, a, b, stats, filters, 100, False, allow_empty=True, workers=1)
    for name in want.data_vars:
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)


def test_uncompressed_id_chunks_are_counted_in_place_and_damage_is_still_refused(tmp_path):
    """format_version 3 stores its routing ids with lz4 and no shuffle; on near-random ids Blosc keeps
    the chunk as is (its "memcpyed" flag), and the counter maps the file instead of decoding it.
    Counts equal zarr's arrays counted in numpy; a cut or padded frame is a one-line error."""
    from moetrace.counting.chunks import ChunkReader

    rng = np.random.default_rng(7)
    n, L, K, E = 768, 2, 4, 64  # 3 whole chunks (a partial last chunk is padded with zeros, which compress)
    experts = random_topk(rng, n, L, K, E)
    path = tmp_path / "t.zarr"
    with TraceStore.create(path, n_layers=L, n_experts=E, top_k=K, chunk_rows=256) as st_:
        st_.append({"seq": np.arange(n) // 64, "pos": np.arange(n) % 64, "experts": experts})
    files = sorted(p for p in (path / "routing" / "experts").rglob("*") if p.is_file() and p.name != "zarr.json")
    assert len(files) == 3 and all(f.read_bytes()[2] & 0x02 for f in files)  # stored as is
    reader = ChunkReader(TraceStore.open(path), ["experts"], (0, n))
    chunk = reader.load(1, reader.buffers())
    assert not chunk["experts"].flags.writeable  # a view of the mapped file, not a copy
    np.testing.assert_array_equal(chunk["experts"], experts[256:512])
    want = np.zeros((L, K, E), np.int64)
    for layer in range(L):
        for rank in range(K):
            want[layer, rank] = np.bincount(experts[:, layer, rank], minlength=E)
    np.testing.assert_array_equal(A.count(path, progress=False)["experts"].values, want)
    good = files[1].read_bytes()
    for damaged, message in [(good[:-1], r"the frame says it is \d+ bytes long, the file has \d+ \(truncated\?\)"),
                             (good + b"\0", r"the frame says .* the file has \d+ \(bytes appended after it\?\)")]:
        files[1].write_bytes(damaged)
        with pytest.raises(MoetraceError, match=r"c/1/0/0: damaged chunk \(" + message):
            A.count(path, progress=False)
    files[1].write_bytes(good)
    np.testing.assert_array_equal(A.count(path, progress=False)["experts"].values, want)
