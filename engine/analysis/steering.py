"""Steering (seed 003's ``interv.py``): boost or ablate one expert's routing at chosen layers for a
prompt and compare the model before and after.

The intervention is :func:`moetrace.intervene.steer` (multiply the expert's routing weight by
``scale`` — 0 ablates it — and, optionally, add ``logit`` to its router logit, which changes whether
it is selected), one context per layer. Outputs: greedy continuations before and after, and at token
position ``target_idx`` of the prompt the next-token distribution before and after: the top tokens
of each, the probability change of every listed token, the KL divergence KL(before || after) and the
total variation distance.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from moetrace.errors import MoetraceError
from moetrace.evaluate import model_device


def _generate(model, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    if max_new_tokens <= 0:
        return []
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad)
    return out[0, ids.shape[1]:].tolist()


def steer_prompt(model: torch.nn.Module, input_ids: Sequence[int], layers: Sequence[int], expert: int, *,
                 scale: float = 0.0, logit: float = 0.0, target_idx: int = -1, max_new_tokens: int = 20,
                 top: int = 10, decode: Callable[[Sequence[int]], str] | None = None) -> dict[str, Any]:
    """Before/after of steering ``expert`` at every layer id in ``layers`` for one prompt.

    scale: factor on the expert's routing weight (0 = ablate, 2 = double); logit: added to its router
    logit (sigmoid routers: its selection score). target_idx: prompt position whose next-token
    distribution is compared (negative counts from the end). Returns a JSON-ready dict: settings,
    ``before`` / ``after`` {"generated_ids", "generated"}, ``next_token`` {"position", "kl", "tv",
    "tokens": [{token_id, text, p_before, p_after, change}] (union of both top-``top`` lists,
    sorted by |change|)}.
    """
    from moetrace.intervene import router_sites, steer

    ids = torch.tensor([list(input_ids)], dtype=torch.long, device=model_device(model))
    if ids.shape[1] == 0:
        raise MoetraceError("--prompt: empty prompt")
    n = ids.shape[1]
    pos = target_idx if target_idx >= 0 else n + target_idx
    if not 0 <= pos < n:
        raise MoetraceError(f"--target-idx: expected a prompt position in [-{n}, {n}), got {target_idx}")
    sites = {s.layer_id: s for s in router_sites(model)}
    for layer in layers:
        if layer not in sites:
            raise MoetraceError(f"--layers: layer {layer} is not an MoE layer (have {sorted(sites)})")
        if not 0 <= expert < sites[layer].spec.n_experts:
            raise MoetraceError(f"--expert: expected an expert id in [0, {sites[layer].spec.n_experts}), got {expert}")
    text = decode or (lambda t: " ".join(str(int(x)) for x in t))

    def run() -> tuple[np.ndarray, list[int]]:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, pos].float()
            return torch.softmax(logits, -1).cpu().numpy().astype(np.float64), _generate(model, ids, max_new_tokens)

    p0, gen0 = run()
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(steer(model, int(layer), int(expert), logit=float(logit), scale=float(scale)))
        p1, gen1 = run()
    listed = sorted(set(np.argsort(-p0)[:top].tolist()) | set(np.argsort(-p1)[:top].tolist()),
                    key=lambda t: -abs(p1[t] - p0[t]))
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = float(np.sum(np.where(p0 > 0, p0 * np.log(p0 / np.maximum(p1, 1e-300)), 0.0)))
    return {
        "layers": [int(x) for x in layers], "expert": int(expert), "scale": float(scale), "logit": float(logit),
        "prompt_ids": ids[0].tolist(), "prompt": text(ids[0].tolist()),
        "before": {"generated_ids": gen0, "generated": text(gen0)},
        "after": {"generated_ids": gen1, "generated": text(gen1)},
        "next_token": {"position": pos, "context": text(ids[0, :pos + 1].tolist()), "kl": kl,
                       "tv": float(0.5 * np.abs(p1 - p0).sum()),
                       "tokens": [{"token_id": int(t), "text": text([t]), "p_before": float(p0[t]),
                                   "p_after": float(p1[t]), "change": float(p1[t] - p0[t])} for t in listed]},
    }
