"""A/B of how dim-reduc gets the routed experts' outputs: every expert on every token then pick the
routed ones (``expert_outputs``, before) vs only the routed ones (``routed_outputs``, now).

    .venv/bin/python bench/bench_dim_reduc_outputs.py MODEL_DIR DOCS.jsonl

Captures layer 1's expert inputs for 5,000 tokens of DOCS (a JSONL of {"text": ...}), then times
both on them, one thread, alternately, 5 rounds; prints the largest difference and median CPU s.
"""
import json
import sys
import time

import numpy as np
import torch

from moetrace.demo import load_demo_model
from moetrace.analysis._common import LayerInputs, expert_outputs, experts_modules, model_inputs, routed_outputs, token_batches
torch.set_num_threads(1)
model, tok = load_demo_model(sys.argv[1])
texts = [json.loads(l)["text"] for l in open(sys.argv[2])][:400]
ids = [tok(t)["input_ids"] for t in texts]
mods = experts_modules(model, [1]); module, E, K = mods[1]
inputs = []
with torch.no_grad(), LayerInputs(mods) as rec:
    for b in token_batches(ids, batch_size=16, num_tokens=5000):
        model(**model_inputs(model, b))
        h, ix = rec.inputs[1]
        real = torch.as_tensor(b["real"])
        inputs.append((h.reshape(-1, h.shape[-1])[real], ix.reshape(-1, ix.shape[-1])[real]))
def old():
    out = []
    for h, ix in inputs:
        T = h.shape[0]; allo = expert_outputs(module, h, E)
        out.append(allo[ix.reshape(-1).long(), torch.arange(T).repeat_interleave(K)])
    return torch.cat(out)
def new():
    return torch.cat([routed_outputs(module, h, ix).reshape(-1, h.shape[-1]) for h, ix in inputs])
with torch.no_grad():
    a, b = old(), new()
    print("max |old - new| =", float((a - b).abs().max()), "points", a.shape)
    t = {"old": [], "new": []}
    for _ in range(5):
        for name, f in (("old", old), ("new", new)):
            c = time.process_time(); f(); t[name].append(time.process_time() - c)
print({k: round(float(np.median(v)), 3) for k, v in t.items()}, "ratio old/new", round(np.median(t["old"]) / np.median(t["new"]), 2))
