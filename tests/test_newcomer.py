"""A newcomer's first day: messages that explain themselves and commands that behave in pipes.

Each test replays something a new user tripped over (issue 9): ``specialize`` with seed 000's
default threshold on three groups, ``moetrace info ... | head``, a specialist table whose printed
numbers contradicted its ``cv > q75`` heading, and prompts for the demo model.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace import metrics
from moetrace.cli import main
from moetrace.commands.specialize import nothing_selected_warning
from moetrace.commands.stats import _fmt_apart
from moetrace.store import TraceStore

DOMAINS = ("arith", "code", "facts")


def _three_group_store(path, n_seq=30, seq_len=12, n_layers=3, n_experts=6, top_k=2, seed=0):
    """A store with three equal groups whose routing leans on a few experts per group."""
    rng = np.random.default_rng(seed)
    n = n_seq * seq_len
    seq = np.repeat(np.arange(n_seq), seq_len)
    domain = np.array(DOMAINS)[seq % len(DOMAINS)]
    first = (rng.integers(0, 2, n) + 2 * (seq % len(DOMAINS))) % n_experts
    experts = np.empty((n, n_layers, top_k), dtype=np.int64)
    for layer in range(n_layers):
        experts[:, layer, 0] = (first + layer * (rng.random(n) < 0.3)) % n_experts
        experts[:, layer, 1] = (experts[:, layer, 0] + 1 + rng.integers(0, n_experts - 1, n)) % n_experts
    with TraceStore.create(path, n_layers=n_layers, n_experts=n_experts, top_k=top_k,
                           labels={"domain": list(DOMAINS)}) as store:
        store.append({"seq": seq, "pos": np.tile(np.arange(seq_len), n_seq), "domain": domain,
                      "experts": experts})
    return path


@pytest.fixture(scope="module")
def counts_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("newcomer")
    store = _three_group_store(tmp / "trace.zarr")
    out = tmp / "counts.zarr"
    assert main(["count", str(store), str(out), "--stats", "experts,paths,pairs,temporal", "--by", "domain"]) == 0
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_max_threshold_is_the_largest_that_still_selects(seed):
    """At max_threshold the rule keeps at least one item; one float step above it keeps none."""
    rng = np.random.default_rng(seed)
    paths = rng.integers(0, 5, (3, 3, 4, 4)) * (rng.random((3, 3, 4, 4)) < 0.5)
    paths[:, 0] = 0
    paths[0, 1, 0, 0] += 1  # the group has at least one sample past the first layer
    ds = xr.Dataset({"paths": (("domain", "layer", "prev_expert", "expert"), paths)},
                    coords={"domain": list(DOMAINS), "layer": [0, 1, 2]}, attrs={"moetrace_counts_version": 1})
    best = metrics.specialized(ds, "paths", {"domain": "arith"}, threshold=1.0).max_threshold
    assert best >= 1.0  # some path's share from the group is at least the group's share
    assert len(metrics.specialized(ds, "paths", {"domain": "arith"}, threshold=best)) >= 1
    above = float(np.nextafter(best, np.inf))
    assert len(metrics.specialized(ds, "paths", {"domain": "arith"}, threshold=above)) == 0


def test_specialize_default_threshold_on_three_groups_explains_itself(counts_path, tmp_path, capsys):
    """Seed 000's default 5 x a group share of 1/3 > 1: nothing can be selected, and the warning says
    why and which threshold would select something; that threshold does select something."""
    out = tmp_path / "targets.json"
    assert main(["specialize", str(counts_path), "--method", "experts", "--group", "domain=arith",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "nothing selected" in err and "> 1" in err
    suggested = err.rsplit("selects something here is ", 1)[1].split()[0]
    assert main(["specialize", str(counts_path), "--method", "experts", "--group", "domain=arith",
                 "--threshold", suggested, "--out", str(out), "--overwrite"]) == 0
    captured = capsys.readouterr()
    assert "nothing selected" not in captured.err
    assert not captured.out.startswith("0 specialized")


def test_specialize_help_says_when_the_threshold_cannot_be_met(capsys):
    with pytest.raises(SystemExit):
        main(["specialize", "--help"])
    assert "selects nothing" in " ".join(capsys.readouterr().out.split())


def test_nothing_selected_without_group_samples():
    sel = metrics.Selection(method="pairs", group={"domain": "x"}, threshold=5.0, min_layer_index=0,
                            group_share=0.0, group_samples=0, all_samples=10, layer=np.zeros(0, np.int64),
                            items=np.zeros((0, 2), np.int64), n_samples=np.zeros(0, np.int64),
                            n_total=np.zeros(0, np.int64), prop=np.zeros(0))
    assert "no pairs samples" in nothing_selected_warning(sel)


@pytest.mark.parametrize("command", ["info", "stats"])
def test_commands_into_a_closed_pipe_end_quietly(counts_path, command):
    """`moetrace info trace.zarr | head` with head already gone: no traceback, SIGPIPE's status."""
    target = counts_path.parent / "trace.zarr" if command == "info" else counts_path
    proc = subprocess.Popen([sys.executable, "-m", "moetrace.cli", command, str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_specialist_table_never_prints_a_cv_equal_to_q75():
    fmt = _fmt_apart(0.534251, [0.534259, 0.9])
    assert fmt(0.534259) != fmt(0.534251)
    assert _fmt_apart(0.5, [0.9])(0.5) == "0.5"
    assert _fmt_apart(None, [])(None) == "-"


def test_stats_prints_specialists_strictly_above_q75(counts_path, capsys):
    assert main(["stats", str(counts_path)]) == 0
    out = capsys.readouterr().out
    heading = next(line for line in out.splitlines() if "specialists: cv > q75 = " in line)
    q75 = float(heading.split("cv > q75 = ")[1].split(";")[0])
    table = out.split(heading, 1)[1].splitlines()[1:]
    cvs = [float(line.split()[1]) for line in table[1:] if line.split() and line.split()[0].isdigit()]
    assert all(cv > q75 for cv in cvs)


def test_demo_prompts_use_only_words_the_demo_tokenizer_knows(tmp_path):
    from moetrace.demo.data import build_tokenizer, make_texts
    from moetrace.demo.run import write_example_prompts

    path = write_example_prompts(tmp_path / "prompts.jsonl", make_texts(n_per_group=3))
    import json

    prompts = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(prompts) == 2 * 8  # two per (domain, lang)
    tok = build_tokenizer()
    for p in prompts:
        assert {"text", "domain", "lang"} <= set(p)
        assert tok.unk_token_id not in tok(p["text"])["input_ids"]


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-12, max_value=1e12, allow_nan=False))
def test_the_suggested_threshold_is_short_and_never_above_the_largest_that_selects(value):
    """Rounded down to 3 significant digits: 1.7966666666666669 reads 1.79, not its full repr (rounding to
    nearest would go above the value, where nothing is selected)."""
    from moetrace.commands.specialize import _at_most

    text = _at_most(value)
    assert 0 < float(text) <= value and float(text) >= value * (1 - 1e-2)
    assert _at_most(1.7966666666666669) == "1.79"


def test_errors_say_what_was_found_and_what_to_do(counts_path, tmp_path, capsys):
    """A mistyped path, a trace store where counts are expected and the reverse, a run directory given as a
    store: one line each, naming what was found and the command to run."""
    store = counts_path.parent / "trace.zarr"
    cases = [
        (["info", str(tmp_path / "trace.zar")], "no such file or directory"),
        (["stats", str(tmp_path / "counts.zar")], "no such counts file"),
        (["stats", str(store)], f"a trace store, not a counts file; count it first: `moetrace count {store}"),
        (["specialize", str(store), "--method", "experts", "--group", "domain=arith", "--out",
          str(tmp_path / "t.json")], "a trace store, not a counts file"),
        (["info", str(counts_path)], f"a counts file (what `moetrace count` writes), not a trace store; read it "
                                     f"with `moetrace stats {counts_path}`"),
        (["info", str(counts_path.parent)], f"a run directory, not a trace store; its store is {store}"),
        (["profile", str(store), "--layers", "7", "--expert", "1", "--out", str(tmp_path / "a")],
         "--layers: layer 7 is not a recorded MoE layer"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, (argv, err)


def test_stats_prints_the_significance_level_it_tests_at(counts_path, capsys):
    assert main(["stats", str(counts_path)]) == 0
    assert "(significant: p < alpha = 0.001, seed 002's level)" in capsys.readouterr().out
