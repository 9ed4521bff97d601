"""Wall time and peak memory of each analysis command on the demo model, at several token counts.

    .venv/bin/python bench/bench_analysis.py --tokens 25000 50000 100000 [--work /tmp/an_bench]
        [--model-dir ~/.cache/moetrace/demo-8aad9b26f4e0]

Writes the demo corpus as JSONL (enough documents for the largest count), captures it once with
``--probs`` (labels domain, lang) into a store, then runs every command as its own process under
``/usr/bin/time -v`` (so each peak RSS is that command's own) and prints one Markdown row per
(command, tokens): wall seconds, CPU seconds (user + system), peak RSS; then per command the
exponent b of a least-squares fit ``y ~ tokens^b`` of each over the token counts.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds user + system, peak RSS MiB) of ``cmd`` run under /usr/bin/time -v."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = wall.groups()
    seconds = int(h or 0) * 3600 + int(m) * 60 + float(s)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr).group(1)) for kind in ("User", "System"))
    return seconds, cpu, rss


def growth_exponent(tokens: list[int], values: list[float]) -> float:
    """Slope of log(value) against log(tokens): value grows like tokens^slope."""
    import numpy as np

    return float(np.polyfit(np.log(tokens), np.log(values), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--work", default="/tmp/moetrace_analysis_bench")
    ap.add_argument("--only", nargs="*", default=None, help="run only these commands")
    ap.add_argument("--model-dir", default=None,
                    help="a saved model directory to use (e.g. the cached trained demo model); "
                         "default: ensure_demo_model()")
    ap.add_argument("--random-demo", action="store_true",
                    help="use the demo model's architecture and tokenizer with random weights instead of the "
                         "trained demo model (cost does not depend on the weights; no 2.5 min build)")
    args = ap.parse_args()
    from moetrace.demo.data import make_training_documents
    from moetrace.demo.model import ensure_demo_model

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.model_dir:
        model = str(Path(args.model_dir).expanduser())
    elif args.random_demo:
        import torch
        from transformers import AutoModelForCausalLM

        from moetrace.demo.data import build_tokenizer
        from moetrace.demo.model import DemoConfig, _model_config

        model = str(work / "random_demo_model")
        if not Path(model, "config.json").exists():
            tok = build_tokenizer()
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(_model_config(DemoConfig(), tok)).save_pretrained(model)
            tok.save_pretrained(model)
    else:
        model = str(ensure_demo_model(progress=False))
    n_max = max(args.tokens)
    data = work / "docs.jsonl"
    store = work / "trace.zarr"
    py = [sys.executable, "-m", "moetrace.cli"]
    if not store.exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        docs, total, seed = [], 0, 1
        while total < n_max:
            for d in make_training_documents(2000, seed=seed):
                docs.append(d)
                total += len(tok(d["text"])["input_ids"])
            seed += 1
        data.write_text("".join(json.dumps({k: d[k] for k in ("text", "domain", "lang")}) + "\n" for d in docs))
        t, cpu, rss = timed([*py, "capture", "--model", model, "--data", str(data), str(store), "--labels", "domain,lang",
                        "--probs", "--quiet", "--batch-size", "32"])
        print(f"capture --probs of {total} tokens: {t:.1f} s, {cpu:.1f} CPU s, {rss:.0f} MiB", flush=True)
    out = work / "out"
    m = ["--model", model, "--data", str(data), "--labels", "domain,lang"]
    commands = {
        "decisiveness": lambda n: ["decisiveness", str(store), "--num-tokens", str(n)],
        "router-metrics": lambda n: ["router-metrics", str(store), "--num-tokens", str(n)],
        "lang-domain": lambda n: ["lang-domain", str(store), "--num-tokens", str(n)],
        "profile": lambda n: ["profile", str(store), "--layers", "1", "--expert", "3", "--num-tokens", str(n)],
        "router-stats": lambda n: ["router-stats", *m, "--num-tokens", str(n)],
        "similarity": lambda n: ["similarity", *m, "--num-tokens", str(n)],
        "dim-reduc": lambda n: ["dim-reduc", *m, "--layers", "1", "--method", "pca", "--num-tokens", str(n)],
    }
    print("| command | tokens | wall s | CPU s | peak RSS MiB |\n|---|---|---|---|---|", flush=True)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for name, make in commands.items():
        if args.only is not None and name not in args.only:
            continue
        for n in args.tokens:
            t, cpu, rss = timed([*py, *make(n), "--out", str(out)])
            rows.setdefault(name, []).append((t, cpu, rss))
            print(f"| {name} | {n:,} | {t:.1f} | {cpu:.1f} | {rss:.0f} |", flush=True)
    if len(args.tokens) > 1:
        print("\n| command | exponent of wall s | of CPU s | of peak RSS |\n|---|---|---|---|")
        for name, r in rows.items():
            exps = [growth_exponent(args.tokens, [x[i] for x in r]) for i in range(3)]
            print(f"| {name} | " + " | ".join(f"{e:.2f}" for e in exps) + " |", flush=True)


if __name__ == "__main__":
    main()
