"""Expert similarity at a real model's layer size: all 64 experts of an OLMoE-1B-7B-shaped layer.

    .venv/bin/python bench/bench_similarity.py --tokens 1000 2000

One process per token count (so each peak RSS is that run's own): a random-weight OlmoeForCausalLM
with OLMoE-1B-7B's expert shape (hidden 2048, intermediate 1024, 64 experts, top-8) and one layer,
``expert_similarity`` over all experts (cosine and exact linear CKA) and ``weight_similarity``
(cosine and CKA of the weights). Prints one Markdown row per count: the CKA form chosen, seconds
for the activations and for the weights, peak RSS (the model's 1.6 GiB of expert weights included).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time


def one(n: int) -> None:
    import numpy as np
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from moetrace.analysis._common import token_batches
    from moetrace.analysis.similarity import expert_similarity, weight_similarity

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=1000, hidden_size=2048, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                         eos_token_id=None, pad_token_id=0)
    model = OlmoeForCausalLM(config).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 1000, size=100).tolist() for _ in range(n // 100 + 1)]
    t0 = time.perf_counter()
    ds = expert_similarity(model, token_batches(seqs, batch_size=2, num_tokens=n), layers=[0])
    t1 = time.perf_counter()
    weight_similarity(model, [0])
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"| {n:,} | 64 x 2048 | {ds.attrs['cka_form']} | {t1 - t0:.0f} | {t2 - t1:.0f} | {peak:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1000, 2000])
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one is not None:
        one(args.one)
        return
    print("| tokens | experts x hidden | CKA form | activations s | weights s | peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for n in args.tokens:
        subprocess.run([sys.executable, __file__, "--one", str(n)], check=True)


if __name__ == "__main__":
    main()
