"""moetrace.targets: JSON formats (seed 000's bare export and the combined format), validation,
dense tables against plain loops, and glue from moetrace.metrics.specialized."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace import metrics
from moetrace.errors import MoetraceError
from moetrace.targets import FORMAT, Targets

# What R writes for seed 000's path targets: jsonlite::toJSON(auto_unbox = T, pretty = F) + writeLines
SEED_PATH_JSON = '{"1":[[3,5],[7,2]],"2":[[[0,4],6]],"10":[[1,1]]}\n'


def test_empty_targets():
    t = Targets()
    assert t.is_empty() and t.layers() == [] and t.max_prefix_len() == 0
    assert not t.expert_table([0, 1], 4).any()
    logit, scale = t.boost_arrays([0, 1], 4)
    assert (logit == 0).all() and (scale == 1).all() and logit.dtype == np.float32


def test_load_seed_path_file(tmp_path):
    path = tmp_path / "path_ablation_targets.json"
    path.write_text(SEED_PATH_JSON)
    t = Targets.load(path, kind="paths")
    assert t.paths == {1: [((3,), 5), ((7,), 2)], 2: [((0, 4), 6)], 10: [((1,), 1)]}
    assert t.max_prefix_len() == 2
    out = tmp_path / "again.json"
    t.save_bare(out, "paths")
    assert out.read_text() == SEED_PATH_JSON  # numeric key order, bare-int prefixes, compact


def test_bare_experts_and_pairs(tmp_path):
    t = Targets(experts={3: [5, 1, 5], 1: [0]}, pairs={2: [(4, 1), (0, 3)]})
    assert t.experts == {1: [0], 3: [1, 5]}
    with pytest.raises(MoetraceError, match="cannot hold the pairs"):
        t.bare_json("experts")
    e = Targets(experts=t.experts)
    assert e.bare_json("experts") == '{"1":[0],"3":[1,5]}'
    p = Targets(pairs=t.pairs)
    assert p.bare_json("pairs") == '{"2":[[0,3],[4,1]]}'
    for kind, obj in (("experts", e), ("pairs", p)):
        f = tmp_path / f"{kind}.json"
        obj.save_bare(f, kind)
        assert Targets.load(f, kind=kind) == obj
    f = tmp_path / "unboxed.json"
    f.write_text('{"4":7,"5":[1,2]}')  # R's auto_unbox writes a single expert as a bare integer
    assert Targets.load(f, kind="experts").experts == {4: [7], 5: [1, 2]}


def test_combined_round_trip(tmp_path):
    t = Targets(
        experts={0: [1]},
        paths={2: [((1,), 3), ((0, 2), 1)]},
        pairs={1: [(2, 3)]},
        boosts={1: {4: {"logit": 2.5, "scale": 0.5}, 0: {"scale": 0.0}}},
        mask_mode="zero",
    )
    f = tmp_path / "t.json"
    t.save(f)
    data = json.loads(f.read_text())
    assert data["format"] == FORMAT and data["mask_mode"] == "zero"
    assert data["paths"] == {"2": [[[0, 2], 1], [1, 3]]}
    assert data["boosts"]["1"]["0"] == {"logit": 0.0, "scale": 0.0}
    back = Targets.load(f)
    assert back == t
    with pytest.raises(MoetraceError, match="combined targets file"):
        Targets.load(f, kind="paths")


@pytest.mark.parametrize(
    "text, kind, match",
    [
        ('{"1":[[3,-5]]}', "paths", "non-negative integer id, got -5"),
        ('{"1":[[3.0,5]]}', "paths", "got 3.0"),
        ('{"1":[[3,5,6]]}', "paths", r"\[prefix, target\]"),
        ('{"1":[3]}', "paths", r"\[prefix, target\]"),
        ('{"1":[[[],5]]}', "paths", "non-empty prefix"),
        ('{"x":[[3,5]]}', "paths", "layer id"),
        ('[[3,5]]', "paths", "expected an object"),
        ('{"1":[[true,5]]}', "paths", "got True"),
        ('{"1":[[1,2,3]]}', "pairs", r"\[first, second\]"),
        ('{"1":["a"]}', "experts", "got 'a'"),
        ('{"1":[1]', "experts", "not valid JSON"),
        ('{"format":"moetrace.targets/2"}', None, "unknown format 'moetrace.targets/2'"),
        ('{"1":[1]}', None, 'no "format" key'),
        ('{"format":"moetrace.targets/1","mask_mode":"drop"}', None, "mask_mode"),
        ('{"format":"moetrace.targets/1","boosts":{"1":{"2":{"gain":1}}}}', None, "logit"),
        ('{"format":"moetrace.targets/1","boosts":{"1":{"2":{"logit":"x"}}}}', None, "expected a number"),
        ('{"format":"moetrace.targets/1","extra":{}}', None, "unknown keys"),
        ("[" * 100000 + "]" * 100000, "paths", "nested too deeply"),
        ('{"format":"moetrace.targets/1","paths":' + "[" * 5000 + "]" * 5000 + "}", None, "nested too deeply"),
    ],
)
def test_load_errors(tmp_path, text, kind, match):
    f = tmp_path / "bad.json"
    f.write_text(text)
    with pytest.raises(MoetraceError, match=match):
        Targets.load(f, kind=kind)


def test_load_non_utf8_is_a_one_line_error(tmp_path):
    f = tmp_path / "bad.json"
    f.write_bytes(b'{"1": [[3, 5]], "caf\xe9": 1}')
    with pytest.raises(MoetraceError, match="not UTF-8 text"):
        Targets.load(f, kind="paths")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(data=st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from(["0", "1", "12", "-1", "x"]), JSON_VALUES,
                                                    max_size=3)),
       kind=st.sampled_from([None, "paths", "experts", "pairs"]), combined=st.booleans())
def test_fuzz_any_json_loads_or_is_a_one_line_error(tmp_path_factory, data, kind, combined):
    """Random JSON: a Targets object or a one-line MoetraceError, never another exception."""
    if combined and isinstance(data, dict):
        data = {"format": "moetrace.targets/1", **{k: v for k, v in data.items() if k in ("paths", "experts")},
                "paths": data}
    f = tmp_path_factory.mktemp("t") / "t.json"
    f.write_text(json.dumps(data))
    try:
        Targets.load(f, kind=kind)
    except MoetraceError as exc:
        assert "\n" not in str(exc)


def test_load_missing_file_and_bad_kind(tmp_path):
    with pytest.raises(MoetraceError, match="not found"):
        Targets.load(tmp_path / "nope.json", kind="paths")
    f = tmp_path / "t.json"
    f.write_text("{}")
    with pytest.raises(MoetraceError, match="kind"):
        Targets.load(f, kind="routes")
    assert Targets.load(f, kind="paths").is_empty()
    f.write_text("[]")  # R writes an empty unnamed list for an empty selection
    assert Targets.load(f, kind="paths").is_empty()


def test_validate():
    t = Targets(experts={5: [1]}, paths={7: [((2,), 3)]})
    t.validate([3, 5, 7], 4)
    with pytest.raises(MoetraceError, match="layer 5 is not a recorded MoE layer"):
        t.validate([3, 7], 4)
    with pytest.raises(MoetraceError, match="expert 3, expected ids below 3"):
        t.validate([3, 5, 7], 3)
    deep = Targets(paths={5: [((1, 2), 0)]})
    with pytest.raises(MoetraceError, match="only 1 recorded layers"):
        deep.validate([3, 5], 4)
    with pytest.raises(MoetraceError, match="length 1"):
        deep.path_table([0, 3, 5], 4)


rule_layers = st.sampled_from([0, 2, 5, 9])
expert_ids = st.integers(0, 5)


@settings(max_examples=50, deadline=None)
@given(
    experts=st.dictionaries(rule_layers, st.lists(expert_ids, max_size=4)),
    paths=st.dictionaries(st.sampled_from([2, 5, 9]), st.lists(st.tuples(expert_ids, expert_ids), max_size=4)),
    pairs=st.dictionaries(rule_layers, st.lists(st.tuples(expert_ids, expert_ids), max_size=4)),
    boosts=st.dictionaries(rule_layers, st.dictionaries(expert_ids, st.fixed_dictionaries(
        {"logit": st.floats(-5, 5), "scale": st.floats(0, 3)}), max_size=3)),
)
def test_dense_tables_match_loops(experts, paths, pairs, boosts):
    layer_ids = [0, 2, 5, 9]
    t = Targets(experts=experts, paths={l: [((p,), e) for p, e in v] for l, v in paths.items()},
                pairs=pairs, boosts=boosts)
    et, pt, qt = t.expert_table(layer_ids, 6), t.path_table(layer_ids, 6), t.pair_table(layer_ids, 6)
    logit, scale = t.boost_arrays(layer_ids, 6)
    for i, layer in enumerate(layer_ids):
        for e in range(6):
            assert et[i, e] == (e in experts.get(layer, []))
            assert logit[i, e] == np.float32(boosts.get(layer, {}).get(e, {"logit": 0.0})["logit"])
            assert scale[i, e] == np.float32(boosts.get(layer, {}).get(e, {"scale": 1.0})["scale"])
            for f in range(6):
                assert pt[i, e, f] == ((e, f) in paths.get(layer, []))
                assert qt[i, e, f] == ((e, f) in pairs.get(layer, []))
    assert t.is_empty() == (not et.any() and not pt.any() and not qt.any() and not any(boosts.values()))


@settings(max_examples=30, deadline=None)
@given(
    a=st.dictionaries(rule_layers, st.lists(expert_ids, max_size=3)),
    b=st.dictionaries(rule_layers, st.lists(expert_ids, max_size=3)),
)
def test_merge_is_union(a, b):
    merged = Targets(experts=a) | Targets(experts=b)
    expected = {l: sorted(set(a.get(l, [])) | set(b.get(l, []))) for l in set(a) | set(b)}
    assert merged.experts == {l: v for l, v in sorted(expected.items()) if v}
    assert merged == Targets(experts=b).merge(Targets(experts=a))


def test_merge_conflicts():
    with pytest.raises(MoetraceError, match="mask_mode differs"):
        Targets(experts={1: [0]}) | Targets(experts={1: [2]}, mask_mode="zero")
    assert (Targets(boosts={1: {0: {"logit": 1.0}}}) | Targets(experts={1: [2]}, mask_mode="zero")).mask_mode == "zero"
    with pytest.raises(MoetraceError, match="boosts of layer 1 expert 0 differ"):
        Targets(boosts={1: {0: {"logit": 1.0}}}) | Targets(boosts={1: {0: {"logit": 2.0}}})


def test_from_specialized_each_method():
    layer = np.array([1, 1, 3])
    for method, items, attr, expected in [
        ("paths", [[2, 0], [4, 1], [0, 0]], "paths", {1: [((2,), 0), ((4,), 1)], 3: [((0,), 0)]}),
        ("experts", [[2], [4], [0]], "experts", {1: [2, 4], 3: [0]}),
        ("pairs", [[2, 0], [4, 1], [0, 5]], "pairs", {1: [(2, 0), (4, 1)], 3: [(0, 5)]}),
    ]:
        sel = metrics.Selection(method=method, group={"domain": "x"}, threshold=1.0, min_layer_index=0,
                                group_share=0.5, group_samples=1, all_samples=2, layer=layer,
                                items=np.array(items), n_samples=np.ones(3, int), n_total=np.ones(3, int),
                                prop=np.ones(3))
        assert getattr(Targets.from_specialized(method, sel), attr) == expected
    with pytest.raises(MoetraceError, match="2 expert ids per paths item"):
        Targets.from_specialized("paths", dataclasses.replace(sel, items=np.array([[1], [2], [3]])))
