"""The trace half of the demo: seed 000's analysis run end to end on a built-in trace.

Steps, each through the same public functions a user calls:

1. write a synthetic trace with planted specialization in seed 000's CSV format
   (``moetrace.synthetic.write_seed000_csv``);
2. ``import_csv`` it into a TraceStore and print ``info``;
3. ``count`` experts, paths, pairs, temporal and co-activation by domain and language,
   after seed 000's shared-prefix filter; save the counts;
4. seed 000's base accuracy per group and seed 002's layer ranking, entropy, stickiness;
5. for every group and method (paths, experts, pairs), the specialized targets, written as
   seed 000's bare JSON, and their coverage per group;
6. export the store to long-format Parquet and import it back, checking equality.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from moetrace import metrics
from moetrace.counting import count, coverage, save_counts, sequence_table
from moetrace.io import export_parquet, import_csv, import_parquet
from moetrace.synthetic import TraceSpec, write_seed000_csv
from moetrace.targets import Targets

METHODS = ("paths", "experts", "pairs")
DEFAULT_SPEC = TraceSpec(n_tokens=400 * 48, n_layers=8, n_experts=32, top_k=4, seq_len=48, seed=0)


def _table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def run_trace_demo(out: str | Path, spec: TraceSpec = DEFAULT_SPEC, progress: bool = True,
                   verbose: bool = True) -> dict:
    """Run the trace demo into directory ``out``; returns a summary dict (also saved as JSON).

    ``verbose``: print each step's results (tables); otherwise only errors surface.
    """
    say = print if verbose else (lambda *args, **kwargs: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary: dict = {}

    samples, topks = write_seed000_csv(out / "csv", spec)
    say(f"[1/6] wrote seed-000 CSVs: {samples} and {topks}")

    store = import_csv(samples, topks, out / "trace.zarr", overwrite=True, progress=progress)
    info = store.info()
    summary["rows"] = info["rows"]
    say(f"[2/6] imported {info['rows']:,} tokens ({info['routing_rows']:,} routing rows), "
          f"{info['sequences']} questions, {info['n_layers']} layers, top-{info['top_k']} of "
          f"{info['n_experts']} experts -> {store.path}")

    by = ["domain", "lang"]
    counts = count(store, stats=["experts", "paths", "pairs", "temporal", "coact"], by=by,
                   skip_shared_prefix=True, progress=progress)
    save_counts(counts, out / "counts.zarr")
    say(f"[3/6] counted after dropping the prefix every question shares (its first "
          f"{counts.attrs['shared_prefix_tokens']} tokens) -> {out / 'counts.zarr'}")

    seqs = sequence_table(store, by, skip_shared_prefix=True)
    acc = metrics.base_accuracy(seqs, by)
    ranking = metrics.layer_ranking(counts)
    ent = metrics.entropy(counts)
    sticky = metrics.stickiness(counts)
    say("[4/6] base accuracy per group (seed 000):")
    say(_table([{"domain": d, "lang": l, "base_acc": f"{a:.2f}", "questions": q}
                  for d, l, a, q in zip(acc["domain"], acc["lang"], acc["base_acc"], acc["questions"])],
                 ["domain", "lang", "base_acc", "questions"]))
    order = np.argsort(-ranking["chi2"].values)
    say("      layers by domain separation (seed 002 chi-square): "
          + ", ".join(f"{int(ranking['layer'].values[i])} (chi2={ranking['chi2'].values[i]:.0f})" for i in order[:3]))
    say(f"      mean entropy {float(ent['entropy'].mean()):.2f} bits of max {float(ent['max_entropy'].max()):.2f}; "
          f"top-1 stickiness {float(sticky['stickiness'].mean()):.3f} vs baseline {float(sticky['baseline'].max()):.3f}")

    targets_dir = out / "targets"
    targets_dir.mkdir(exist_ok=True)
    rows = []
    for domain in counts["domain"].values.tolist():
        for lang in counts["lang"].values.tolist():
            group = {"domain": domain, "lang": lang}
            for method in METHODS:
                selection = metrics.specialized(counts, method, group)
                targets = Targets.from_specialized(method, selection)
                targets.save_bare(targets_dir / f"{domain}_{lang}_{method}.json", method)
                cov = coverage(store, targets, by=by, kind=method, skip_shared_prefix=True, progress=False)
                own = cov.sel(domain=domain, lang=lang)
                others = cov.where(~((cov["domain"] == domain) & (cov["lang"] == lang)))
                rows.append({
                    "group": f"{domain}/{lang}", "method": method, "items": len(selection),
                    "own_coverage": f"{float(own['prop_targeted']):.3f}",
                    "others_coverage": f"{float(others['prop_targeted'].mean()):.3f}",
                })
    summary["targets"] = rows
    say(f"[5/6] specialized targets (seed 000 rules) -> {targets_dir}/<domain>_<lang>_<method>.json; "
          "share of each group's routes they cover:")
    say(_table(rows, ["group", "method", "items", "own_coverage", "others_coverage"]))

    parquet = export_parquet(store, out / "trace.parquet", overwrite=True, progress=progress)
    back = import_parquet(parquet, out / "roundtrip.zarr", overwrite=True, progress=progress)
    columns = ["seq", "pos", "experts", "weights", *by]
    a, b = store.read(columns), back.read(columns)
    same = all(np.array_equal(a[c], b[c]) for c in columns) and store.labels == back.labels
    summary["parquet_round_trip_equal"] = bool(same)
    say(f"[6/6] exported {parquet} ({parquet.stat().st_size / 1e6:.1f} MB) and imported it back: "
          f"{'identical' if same else 'DIFFERENT'}")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "trace_summary.json").write_text(json.dumps(summary, indent=2))
    if not same:
        raise RuntimeError("Parquet round trip changed the trace")
    return summary
