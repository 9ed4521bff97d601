"""Model-level overhead of patched routing and of capture, on CPU or GPU.

    .venv/bin/python bench/bench_intervene.py [--families olmoe,qwen3_moe,mixtral,deepseek_v3]
                                              [--batch 8] [--seq 128] [--repeats 7] [--threads 1]

For each family, a small randomly initialized model of the real transformers class
(4 layers, hidden 256, 16 experts, top-2 or 4) runs the same forward, side by side in one
process, as:
- ``unpatched``: the model as transformers ships it;
- ``intervene-empty``: inside ``intervene(model, Targets())`` (routing rebuilt and routed by
  ``fused_route``; torch path on CPU, Triton on CUDA);
- ``intervene-mask``: with two experts of every layer masked (reroute);
- ``capture``: inside ``capture(model, store)`` (routing recorded into a TraceStore by the
  background writer; the forward is timed, the store flushed after the timed runs).
Reports the median forward time over ``--repeats`` interleaved rounds and the ratio to
unpatched.
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
from tiny_models import tiny_config, tiny_model  # noqa: E402

from moetrace.capture import capture  # noqa: E402
from moetrace.intervene import intervene, router_sites  # noqa: E402
from moetrace.targets import Targets  # noqa: E402

SMALL = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, expert_intermediate_size=256,
             shared_expert_intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, head_dim=32, num_experts=16, num_local_experts=16, n_routed_experts=16,
             vocab_size=1024, n_group=4, topk_group=2, kv_lora_rank=64, q_lora_rank=64,
             qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default="olmoe,qwen3_moe,mixtral,deepseek_v3")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"Command: `.venv/bin/python bench/bench_intervene.py --families {args.families} --batch {args.batch} "
          f"--seq {args.seq} --repeats {args.repeats} --threads {args.threads}` on {device}\n")
    print("| family | tokens/forward | unpatched ms | intervene-empty | intervene-mask | capture |")
    print("|---|---|---|---|---|---|")
    for family in args.families.split(","):
        fields = set(type(tiny_config(family)).__dataclass_fields__)
        model = tiny_model(family, **{k: v for k, v in SMALL.items() if k in fields}).to(device)
        sites = router_sites(model)
        masks = Targets(experts={s.layer_id: [0, 1] for s in sites})
        ids = torch.randint(3, 1024, (args.batch, args.seq), device=device)
        with tempfile.TemporaryDirectory() as tmp:
            store_path = Path(tmp) / "t.zarr"
            variants = {
                "unpatched": None,
                "intervene-empty": lambda: intervene(model, Targets()),
                "intervene-mask": lambda: intervene(model, masks),
                "capture": lambda: capture(model, store_path),
            }
            times = {name: [] for name in variants}
            with torch.no_grad():
                model(ids)  # warm-up
                for _ in range(args.repeats):
                    for name, ctx in variants.items():
                        if ctx is None:
                            times[name].append(timed(lambda: model(ids), device))
                            continue
                        with ctx():
                            model(ids)  # warm-up inside the context (first call compiles / creates)
                            times[name].append(timed(lambda: model(ids), device))
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["unpatched"]
        cells = " | ".join(f"{med[k] * 1e3:.1f} ms ({med[k] / base:.2f}x)"
                           for k in ("intervene-empty", "intervene-mask", "capture"))
        print(f"| {family} | {args.batch * args.seq:,} | {base * 1e3:.1f} | {cells} |")


if __name__ == "__main__":
    main()
