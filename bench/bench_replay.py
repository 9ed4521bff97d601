"""Forward time of a tiny OLMoE (3 MoE layers, E = 8, K = 2): plain, patched (observe_routing), under replay.

    .venv/bin/python bench/bench_replay.py [--batch 8] [--seq-len 128]

One thread, the CPU routing path; median of 7 interleaved rounds of 5 forwards. Under replay each
forward is preceded by ``set_batch`` (the store lookup of a new batch), as in a training loop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import VOCAB, tiny_model  # noqa: E402

from moetrace.capture import capture  # noqa: E402
from moetrace.intervene import observe_routing  # noqa: E402
from moetrace.replay import replay  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    B, S = args.batch, args.seq_len
    model = tiny_model("olmoe", 0)
    ids = torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(B, S, dtype=torch.long)
    seq = list(range(B))
    path = Path(tempfile.mkdtemp()) / "trace.zarr"
    with capture(model, path) as cap:
        cap.set_batch(seq=seq)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    def run(rp=None) -> float:
        start = time.perf_counter()
        for _ in range(5):
            if rp is not None:
                rp.set_batch(seq=seq)
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        return (time.perf_counter() - start) / 5

    times: dict[str, list[float]] = {"plain": [], "observe_routing": [], "replay (set_batch + forward)": []}
    for _ in range(7):
        times["plain"].append(run())
        with observe_routing(model, lambda event: None):
            times["observe_routing"].append(run())
        with replay(model, path) as rp:
            times["replay (set_batch + forward)"].append(run(rp))
    base = statistics.median(times["plain"])
    for name, values in times.items():
        print(f"{name}: {statistics.median(values) * 1e3:.1f} ms, {statistics.median(values) / base:.2f}x plain")


if __name__ == "__main__":
    main()
