"""Graph breaks of one forward of a tiny OLMoE (3 MoE layers) under each kind of intervention.

    .venv/bin/python bench/compile_breaks.py [--backends torch,triton]

Counts ``torch._dynamo.explain`` graph breaks (CPU; the Triton backend runs under
TRITON_INTERPRET=1) for: no context, empty targets, expert / path / pair ablation, zero mode and
steering, and prints one Markdown table row per case (the first break reason when there is one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

from moetrace.intervene import ablate, intervene, steer  # noqa: E402
from moetrace.targets import Targets  # noqa: E402

CASES = {
    "no context": lambda m, b: torch.no_grad(),
    "empty targets": lambda m, b: intervene(m, Targets(), backend=b),
    "ablate experts {0: [1, 2]}": lambda m, b: ablate(m, experts={0: [1, 2]}, backend=b),
    "ablate paths (1- and 2-layer prefixes)": lambda m, b: ablate(m, paths={1: [((1,), 2)], 2: [((1, 2), 3)]},
                                                                  backend=b),
    "ablate pairs {2: [(1, 2)]}": lambda m, b: ablate(m, pairs={2: [(1, 2)]}, backend=b),
    "ablate experts, mode='zero'": lambda m, b: ablate(m, experts={0: [1, 2]}, mode="zero", backend=b),
    "steer layer 1 expert 3": lambda m, b: steer(m, 1, 3, logit=2.0, scale=0.5, backend=b),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,triton")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = tiny_model("olmoe")
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    print("| backend | case | graph breaks | first reason |\n|---|---|---|---|")
    for backend in args.backends.split(","):
        for name, make in CASES.items():
            torch._dynamo.reset()
            with torch.no_grad(), make(model, backend):
                explained = torch._dynamo.explain(model)(input_ids=ids)
            reasons = [str(r.reason).splitlines()[0][:90] for r in explained.break_reasons]
            print(f"| {backend} | {name} | {explained.graph_break_count} | {reasons[0] if reasons else ''} |", flush=True)


if __name__ == "__main__":
    main()
