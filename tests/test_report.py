"""moetrace.report: the HTML file is self-contained, its images are valid PNGs that a real browser
(headless Chromium) renders, text is escaped, and its numbers match independent references
(SciPy's chi-square, numpy counts of the raw routing, a hand-computed results table)."""

from __future__ import annotations

import base64
import contextlib
import functools
import html.parser
import http.server
import re
import shutil
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace import synthetic
from moetrace.counting import count, save_counts
from moetrace.cli import main as cli_main
from moetrace.errors import MoetraceError
from moetrace.report import REPORT_STATS, write_report
from moetrace.report import SECTIONS as REPORT_SECTIONS
from moetrace.sections import fmt, html_table
from moetrace.store import TraceStore

SPEC = synthetic.TraceSpec(n_tokens=2048, n_layers=4, n_experts=16, top_k=2, seq_len=32)
GROUPS = [f"{d}/{lang}" for d in synthetic.DOMAINS for lang in synthetic.LANGS]
# The sections a run directory with results.csv and counts of every REPORT_STATS grouped by labels
# gets: derived from the report's own list (no routing/probs, no analysis/ files, no coverage column;
# the synthetic trace marks some tokens generated).
AVAILABLE = {"results", "tokens", "groups", "generated", *REPORT_STATS}
SECTIONS = tuple(s.id for s in REPORT_SECTIONS if s.always or set(s.needs) <= AVAILABLE)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


def results_table() -> pd.DataFrame:
    """Hand-made results: ablating a group's routes costs it 0.3 and the others 0.05; two random
    seeds cost 0.01 and 0.03 everywhere (mean 0.02). Base accuracy 0.8 everywhere; base loss 1.0,
    unknown (NaN) for the random rows."""
    rows = []
    for target in GROUPS:
        for evaluated in GROUPS:
            ablated = 0.5 if target == evaluated else 0.75
            rows.append(("experts", target, evaluated, 0, 0.8, ablated, 1.0))
            rows += [("random:experts", target, evaluated, seed, 0.8, 0.8 - drop, float("nan"))
                     for seed, drop in ((0, 0.01), (1, 0.03))]
    return pd.DataFrame(rows, columns=["method", "targeted_group", "evaluated_group", "seed",
                                       "base_accuracy", "ablated_accuracy", "base_loss"])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    synthetic.write_store(run / "trace.zarr", SPEC, progress=False, chunk_rows=1024)
    results_table().to_csv(run / "results.csv", index=False, na_rep="nan")  # as pyarrow writes NaN
    return run


@pytest.fixture(scope="module")
def run_report(run_dir, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("out") / "sub" / "report.html"
    path = write_report(run_dir, out, title='Run <script>alert("x")</script> & co')
    assert path == out
    return out.read_text(encoding="utf-8")


class Page(html.parser.HTMLParser):
    """Tags, attributes, section ids and text of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def attrs(self, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag]


def section(text: str, sec_id: str) -> str:
    start = text.index(f'<section id="{sec_id}">')
    return text[start:text.index("</section>", start)]


def table_rows(fragment: str) -> list[list[str]]:
    """Cell texts of every body row of the tables in an HTML fragment (entities decoded)."""
    rows = []
    for body in re.findall(r"<tbody>(.*?)</tbody>", fragment, flags=re.S):
        for row in re.findall(r"<tr>(.*?)</tr>", body, flags=re.S):
            rows.append([html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)])
    return rows


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature, the IHDR chunk's CRC and the IEND chunk."""
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    ihdr = data[16:29]
    (crc,) = struct.unpack(">I", data[29:33])
    assert zlib.crc32(b"IHDR" + ihdr) == crc
    assert data[-12:] == b"\x00\x00\x00\x00IEND\xaeB`\x82"
    return struct.unpack(">II", ihdr[:8])


def images(text: str) -> list[bytes]:
    page = Page(text)
    out = []
    for attrs in page.attrs("img"):
        src = attrs["src"]
        assert src.startswith("data:image/png;base64,"), src[:40]
        out.append(base64.b64decode(src.split(",", 1)[1], validate=True))
    return out


# ----------------------------------------------------------------------------------------------
# Self-contained, valid, escaped
# ----------------------------------------------------------------------------------------------


def test_self_contained(run_report):
    page = Page(run_report)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", run_report, flags=re.I)
    tags = {t for t, _ in page.tags}
    assert not tags & {"script", "link", "iframe", "object", "embed"}
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            if name in attrs:
                assert attrs[name].startswith(("data:image/png;base64,", "#")), (tag, attrs[name][:40])
    metas = [a for a in page.attrs("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert [m["content"] for m in metas] == [CSP]


def test_every_image_is_a_valid_png(run_report):
    pngs = images(run_report)
    # experiments (one method beside its control), separation, usage, prompt vs generated usage,
    # specialists, paths, pairs, co-activation, stickiness, router metrics, languages vs domains
    assert SECTIONS == ("experiment", "separation", "usage", "generated", "specialists", "paths", "pairs",
                        "coactivation", "stickiness", "router-metrics", "lang-domain", "store")
    assert len(pngs) == 11
    for data in pngs:
        width, height = png_size(data)
        assert 50 < width < 5000 and 50 < height < 5000


def test_sections_and_navigation(run_report):
    page = Page(run_report)
    ids = [a["id"] for t, a in page.tags if t == "section"]
    assert ids == list(SECTIONS)
    assert [a["href"] for a in page.attrs("a")] == [f"#{s}" for s in SECTIONS]


def test_text_is_escaped(run_report):
    page = Page(run_report)
    assert '<script>alert("x")</script>' not in run_report
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in run_report
    assert 'Run <script>alert("x")</script> & co' in page.text  # the <h1> text, decoded


def test_escaping_of_label_values_and_groups(tmp_path):
    """Label values and results groups carrying markup appear as text, never as tags."""
    path = tmp_path / "t.zarr"
    rng = np.random.default_rng(1)
    n = 256
    with TraceStore.create(path, n_layers=2, n_experts=8, top_k=2, labels={"domain": ["<i>bio</i>", "a&b"]}) as st:
        first = rng.integers(0, 8, size=(n, 2))
        st.append({"seq": np.arange(n) // 16, "pos": np.arange(n) % 16,
                   "domain": np.where(np.arange(n) % 32 < 16, "<i>bio</i>", "a&b"),
                   "experts": np.stack([first, (first + 1) % 8], axis=-1)})
    results = pd.DataFrame({"method": ["experts", "experts"], "targeted_group": ["<i>bio</i>"] * 2,
                            "evaluated_group": ["<i>bio</i>", "a&b"], "base_accuracy": [0.5, 0.5],
                            "ablated_accuracy": [0.25, 0.5]})
    text = write_report(path, tmp_path / "r.html", results=results).read_text()
    assert "<i>" not in text
    assert "&lt;i&gt;bio&lt;/i&gt;" in text and "a&amp;b" in text
    assert not {t for t, _ in Page(text).tags} & {"i", "script"}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.text(max_size=12), min_size=2, max_size=2), max_size=4))
def test_table_cells_round_trip(cells):
    """Whatever text goes into a table cell comes back as that text (no markup leaks)."""
    fragment = html_table(["a<", "b&"], cells)
    assert table_rows(fragment) == cells
    page = Page(fragment)
    assert {t for t, _ in page.tags} <= {"table", "thead", "tbody", "tr", "th", "td"}


# ----------------------------------------------------------------------------------------------
# Numbers against independent references
# ----------------------------------------------------------------------------------------------


def test_experiment_summary_matches_hand_computed(run_report):
    rows = table_rows(section(run_report, "experiment"))
    # per method: targeted drop 0.3, off-target 0.05, random (mean of 2 draws) 0.02, targeted - random
    # 0.28, selectivity 6; no summary.json in this run directory: no intervals, no p-value
    assert ["experts", "accuracy drop", "+0.300", "+0.050", "+0.020", "+0.280", "2", "n/a", "6.00", "-", "-"] in rows
    # the results table: one row per (targeted, evaluated) of the real method
    # one format per column: accuracies and losses to 3 decimals, effects signed, "-" where not measured
    detail = [r for r in rows if len(r) == 13]
    assert len(detail) == len(GROUPS) ** 2
    assert ["experts", "math/en", "math/en", "0.800", "0.500", "+0.300", "-", "1.000", "-", "-", "-", "-", "-"] \
        in detail


def test_chi_square_matches_scipy(run_dir, run_report):
    st = TraceStore.open(run_dir / "trace.zarr")
    data = st.read(["experts", "domain", "lang"])
    group = data["domain"].astype(np.int64) * len(st.labels["lang"]) + data["lang"]
    rows = {r[0]: r for r in table_rows(section(run_report, "separation"))}
    for layer in range(SPEC.n_layers):
        matrix = np.zeros((len(GROUPS), SPEC.n_experts), dtype=np.int64)
        for rank in range(SPEC.top_k):
            np.add.at(matrix, (group, data["experts"][:, layer, rank].astype(np.int64)), 1)
        matrix = matrix[:, matrix.sum(axis=0) > 0]
        chi2, p, dof, _ = scipy.stats.chi2_contingency(matrix)
        assert rows[str(layer)][1] == fmt(chi2)
        assert rows[str(layer)][2] == fmt(dof)


def test_top_path_matches_raw_routing(run_dir, run_report):
    """Each group's first listed path is its most frequent (top-1 at l-1 -> top-1 at l), with its share."""
    st = TraceStore.open(run_dir / "trace.zarr")
    data = st.read(["experts", "domain", "lang"])
    top1 = data["experts"][:, :, 0].astype(np.int64)
    domains, langs = st.decode_label("domain", data["domain"]), st.decode_label("lang", data["lang"])
    rows = table_rows(section(run_report, "paths"))
    for name in GROUPS:
        d, lang = name.split("/")
        mine = top1[(domains == d) & (langs == lang)]
        freq: dict[tuple[int, int, int], int] = {}
        for token in mine.tolist():
            for layer in range(1, SPEC.n_layers):
                key = (layer, token[layer - 1], token[layer])
                freq[key] = freq.get(key, 0) + 1
        best = max(freq.values())
        listed = [r for r in rows if r[0] == name]
        assert len(listed) == 10
        layer, path, n, share = int(listed[0][1]), listed[0][2], int(listed[0][3].replace(",", "")), listed[0][4]
        prev, expert = (int(x) for x in path.split(" -> "))
        assert n == best == freq[(layer, prev, expert)]
        assert share == fmt(100.0 * best / sum(freq.values()))
        assert [int(r[3].replace(",", "")) for r in listed] == sorted(freq.values(), reverse=True)[:10]


# ----------------------------------------------------------------------------------------------
# Inputs: saved counts, no labels, no results, errors, CLI
# ----------------------------------------------------------------------------------------------


def test_saved_counts_are_used_and_missing_stats_said(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "trace.zarr", run / "trace.zarr")
    save_counts(count(run / "trace.zarr", stats=["experts"], by=["domain"], progress=False), run / "counts.zarr")
    text = write_report(run, tmp_path / "r.html").read_text()
    assert f"loaded from {run / 'counts.zarr'}" in text
    assert "paths were not counted" in section(text, "paths")
    assert "temporal was not counted" in section(text, "stickiness")
    assert 'id="experiment"' not in text  # no results.csv
    groups = [r[0] for r in table_rows(section(text, "store")) if len(r) == 2 and r[0] in synthetic.DOMAINS]
    assert groups == sorted(synthetic.DOMAINS)  # one group order on the whole page: sorted
    for data in images(text):
        png_size(data)


def test_store_without_labels(tmp_path):
    path = tmp_path / "plain.zarr"
    rng = np.random.default_rng(0)
    n = 300
    with TraceStore.create(path, n_layers=3, n_experts=6, top_k=2) as st:
        first = rng.integers(0, 6, size=(n, 3))
        st.append({"seq": np.arange(n) // 30, "pos": np.arange(n) % 30,
                   "experts": np.stack([first, (first + 2) % 6], axis=-1)})
    text = write_report(path, tmp_path / "r.html").read_text()
    assert "groups: all" in text
    assert "needs at least two groups" in section(text, "specialists")
    assert ["all", "300"] in table_rows(section(text, "store"))
    assert 'id="lang-domain"' not in text  # needs groups
    assert len(images(text)) == 7  # separation, usage, paths, pairs, co-activation, stickiness, router metrics


def test_errors(tmp_path, run_dir):
    with pytest.raises(MoetraceError, match="no such trace store"):
        write_report(tmp_path / "missing", tmp_path / "r.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoetraceError, match="run directory holding trace.zarr"):
        write_report(tmp_path / "empty", tmp_path / "r.html")
    bad = results_table().drop(columns=["ablated_accuracy"])
    with pytest.raises(MoetraceError, match="ablated_accuracy"):
        write_report(run_dir, tmp_path / "r.html", results=bad)
    text = results_table().astype({"base_accuracy": object})
    text.loc[3, "base_accuracy"] = "high"
    with pytest.raises(MoetraceError, match="'base_accuracy' must be numeric"):
        write_report(run_dir, tmp_path / "r.html", results=text)
    with pytest.raises(MoetraceError, match="no such results file"):
        write_report(run_dir, tmp_path / "r.html", results=tmp_path / "none.csv")
    assert not (tmp_path / "r.html").exists()


def test_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "cli.html"
    assert cli_main(["report", str(run_dir / "trace.zarr"), str(out), "--title", "CLI title"]) == 0
    assert "wrote" in capsys.readouterr().out
    text = out.read_text()
    assert "<title>CLI title</title>" in text and 'id="experiment"' not in text
    assert cli_main(["report", str(tmp_path / "nothing"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moetrace report: error:") and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------
# A real browser renders every figure
# ----------------------------------------------------------------------------------------------

CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  var d = document.createElement('div');
  d.id = 'check';
  d.textContent = imgs.length + ';' + broken.map(function (i) { return i.id || 'report'; }).join(',');
  document.body.appendChild(d);
});
</script>"""
# Two images that must fail: a corrupt PNG (proves the check sees broken images) and a valid PNG
# served over HTTP from this test (loads unless the report's Content-Security-Policy blocks it).
CONTROLS = ('<img id="corrupt" src="data:image/png;base64,iVBORw0KGgoAAAAA">'
            '<img id="remote" src="{url}">')


@contextlib.contextmanager
def serve(directory: Path):
    """An HTTP server on 127.0.0.1 serving ``directory``; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def render(browser: str, page: str, tmp_path: Path) -> tuple[int, list[str]]:
    """Load ``page`` plus the check script in headless Chromium: (images, ids of the broken ones)."""
    copy = tmp_path / "check.html"
    copy.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>", 1), encoding="utf-8")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000",
           "--dump-dom", copy.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<div id="check">(\d+);([^<]*)</div>', proc.stdout)
    assert match, f"no check result in the dumped DOM (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return int(match.group(1)), sorted(x for x in match.group(2).split(",") if x)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_chromium_renders_every_image(run_report, tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("no chromium browser found (install Debian's chromium; .ci/run does)")
    assert CSP in run_report
    served = tmp_path / "www"
    served.mkdir()
    (served / "x.png").write_bytes(images(run_report)[0])
    with serve(served) as base:
        controls = CONTROLS.format(url=f"{base}/x.png")
        page = run_report.replace(CSP, CSP + "; script-src 'unsafe-inline'", 1)
        page = page.replace("</body>", controls + "</body>", 1)
        n_images, broken = render(browser, page, tmp_path)
        assert n_images == len(images(run_report)) + 2
        assert broken == ["corrupt", "remote"]
        # the same page with the network allowed loads the served image: the CSP is what blocked it
        open_page = page.replace(CSP, CSP.replace("img-src data:", f"img-src data: {base}"), 1)
        assert render(browser, open_page, tmp_path)[1] == ["corrupt"]


def test_pairs_and_coactivation_match_raw_routing(run_dir, run_report):
    """Each group's first listed pair is its most frequent ordered (rank 0, rank 1) pair; the
    co-activation table's strongest pair per layer is the largest N(Ei, Ej) / N(Ei) of the raw rows."""
    st = TraceStore.open(run_dir / "trace.zarr")
    data = st.read(["experts", "domain", "lang"])
    ex = data["experts"].astype(np.int64)
    domains, langs = st.decode_label("domain", data["domain"]), st.decode_label("lang", data["lang"])
    rows = table_rows(section(run_report, "pairs"))
    for name in GROUPS:
        d, lang = name.split("/")
        mine = ex[(domains == d) & (langs == lang)]
        freq: dict[tuple[int, int, int], int] = {}
        for token in mine.tolist():
            for layer in range(SPEC.n_layers):
                key = (layer, token[layer][0], token[layer][1])
                freq[key] = freq.get(key, 0) + 1
        listed = [r for r in rows if r[0] == name]
        assert [int(r[3].replace(",", "")) for r in listed] == sorted(freq.values(), reverse=True)[:10]
        layer, pair = int(listed[0][1]), listed[0][2]
        first, second = (int(x) for x in pair.strip("()").split(", "))
        assert freq[(layer, first, second)] == max(freq.values())
    co_rows = {r[0]: r for r in table_rows(section(run_report, "coactivation"))}
    for layer in range(SPEC.n_layers):
        sel = np.zeros((len(ex), SPEC.n_experts), dtype=bool)
        sel[np.arange(len(ex))[:, None], ex[:, layer, :]] = True
        both = sel.T.astype(np.int64) @ sel.astype(np.int64)
        ratio = both / np.maximum(np.diag(both)[:, None], 1)
        np.fill_diagonal(ratio, -1)
        assert co_rows[str(layer)][2] == fmt(ratio.max())


def test_targets_section_from_results_coverage(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "trace.zarr", run / "trace.zarr")
    table = results_table()
    table["coverage"] = np.where(table["targeted_group"] == table["evaluated_group"], 0.4, 0.1)
    table.to_csv(run / "results.csv", index=False)
    text = write_report(run, tmp_path / "r.html").read_text()
    rows = table_rows(section(text, "targets"))
    # no targets/ directory: rules unknown; the draws' coverage of the targeted group is 0.4 too (no
    # in_band column in this hand-made table)
    assert ["experts", "math/en", "-", "40", "10", "40.0 (40.0-40.0)", "-"] in rows
    assert len(rows) == len(GROUPS)
    ids = [a["id"] for t, a in Page(text).tags if t == "section"]
    assert ids.index("targets") == ids.index("experiment") + 1
