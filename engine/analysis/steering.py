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
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moetrace.analysis._common import Analysis, write_outputs
from moetrace.commands import _analysis_args as cli
from moetrace.errors import MoetraceError
from moetrace.evaluate import model_device
from moetrace.models.loading import MODEL_HELP, load_model
from moetrace.plotting import Figure
from moetrace.sections import ANALYSIS_DIR, Context, Section, escape, html_table, img, note


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


# ---------------------------------------------------------------------- figure, command, report section

#: The name of the files the command writes (JSON and figure): every setting that changes the result.
OUTPUT = "steer_layers{layers}_expert{expert}_scale{scale}_logit{logit}"
_ANY = OUTPUT.format(layers="*", expert="*", scale="*", logit="*")


def figure(result: dict, top: int = 10) -> Figure:
    """Next-token probability before and after steering (:func:`moetrace.analysis.steer_prompt`)."""
    tokens = result["next_token"]["tokens"][:top]
    fig = Figure(figsize=(max(5.0, 0.6 * len(tokens) + 2), 3.2))
    ax = fig.subplots()
    x = np.arange(len(tokens))
    ax.bar(x - 0.2, [t["p_before"] for t in tokens], 0.4, label="before")
    ax.bar(x + 0.2, [t["p_after"] for t in tokens], 0.4, label="after")
    ax.set_xticks(x, [t["text"] for t in tokens], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("next-token probability", fontsize=8)
    ax.set_title(f"expert {result['expert']} at layers {result['layers']}: scale {result['scale']:g}, "
                 f"logit {result['logit']:+g} (KL {result['next_token']['kl']:.3g})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _arguments(p) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    g.add_argument("--prompt-ids", type=int, nargs="+", metavar="ID", help="prompt token ids")
    p.add_argument("--layers", type=int, nargs="+", required=True, metavar="L", help="layer ids to steer at")
    p.add_argument("--expert", type=int, required=True, metavar="E", help="the expert id to boost or ablate")
    p.add_argument("--scale", type=float, default=0.0, help="factor on the routing weight (0 ablates; default 0)")
    p.add_argument("--logit", type=float, default=0.0, help="added to the expert's router logit (default 0)")
    p.add_argument("--target-idx", type=int, default=-1, help="prompt position whose next token is compared "
                                                                "(default -1: the last)")
    p.add_argument("--max-new-tokens", type=int, default=20, help="greedy tokens generated (default 20)")
    p.add_argument("--num-tokens", type=int, default=None, metavar="N", help="cut the prompt to N tokens")
    p.add_argument("--out", default="analysis", help="output directory (default: ./analysis)")


def _name(layers, expert, scale: float, logit: float) -> str:
    return OUTPUT.format(layers="-".join(map(str, layers)), expert=expert, scale=f"{scale:g}", logit=f"{logit:g}")


def _run(args) -> int:
    model, tokenizer = load_model(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            raise MoetraceError(f"--prompt: the model {args.model} has no tokenizer; pass --prompt-ids")
        ids = tokenizer(args.prompt)["input_ids"]
    else:
        ids = args.prompt_ids
    if args.num_tokens is not None:
        ids = ids[:args.num_tokens]
    res = steer_prompt(model, ids, args.layers, args.expert, scale=args.scale, logit=args.logit,
                       target_idx=args.target_idx, max_new_tokens=args.max_new_tokens,
                       decode=tokenizer.decode if tokenizer is not None else None)
    print(f"prompt: {res['prompt']}\nbefore: {res['before']['generated']}\nafter:  {res['after']['generated']}")
    print(f"next token after position {res['next_token']['position']}: KL {res['next_token']['kl']:.4g}, "
          f"TV {res['next_token']['tv']:.4g}")
    for t in res["next_token"]["tokens"][:10]:
        print(f"  {t['text']!r:>16} {t['p_before']:.4f} -> {t['p_after']:.4f} ({t['change']:+.4f})")
    cli.save(cli.out_dir(args), _name(args.layers, args.expert, args.scale, args.logit), figure(res), data=res)
    return 0


#: What the suite tries on the busiest experts of the first layer: ablate, and boost the router logit.
SUITE_SETTINGS = ((0.0, 0.0), (1.0, 4.0))


def _suite(run) -> list[Path]:
    """An example that shows something: the first half of a document as the prompt (its continuation is not
    in it), the three busiest experts of the first layer each ablated and boosted, and of those the one that
    changes the generated text (else the next-token distribution) most."""
    ids = list(run.input_ids[0])
    prompt = ids[:max(2, min(24, len(ids) // 2))]
    tried = []
    for expert in run.busiest_experts[:3]:
        for scale, logit in SUITE_SETTINGS:
            res = steer_prompt(run.model, prompt, [run.first_layer], expert, scale=scale, logit=logit, target_idx=-1,
                               max_new_tokens=12, decode=run.decode)
            changed = res["before"]["generated"] != res["after"]["generated"]
            tried.append(((changed, res["next_token"]["kl"]), expert, scale, logit, res))
    _, expert, scale, logit, res = max(tried, key=lambda t: t[0])
    return write_outputs(run.out, _name([run.first_layer], expert, scale, logit), figure(res), data=res)


def _render(ctx: Context) -> str:
    body = note("Boosting or ablating one expert's routing for a prompt (moetrace steer): greedy continuations "
                "and the next-token distribution at the chosen position, before and after.")
    for path in sorted(ctx.analysis_dir.glob(_ANY + ".json")):
        r = json.loads(path.read_text())
        title = (f"Expert {r['expert']} at layers {', '.join(map(str, r['layers']))}: routing weight x{r['scale']:g}, "
                 f"router logit {r['logit']:+g}; next-token KL {r['next_token']['kl']:.3g}")
        body += (f"<h3>{escape(title)}</h3>" + img(figure(r), title)
                 + html_table(["", "text"], [["prompt", r["prompt"]], ["before", r["before"]["generated"]],
                                             ["after", r["after"]["generated"]]], text_cols=2))
    return body


ANALYSIS = Analysis(
    command="steer", help="boost or ablate one expert for a prompt: generated text and next-token change",
    example="steer --model demo --prompt \"the derivative of\" --layers 1 --expert 9 --scale 0 --out run/analysis",
    arguments=_arguments, run=_run, order=80,
    outputs=(_ANY + ".json", _ANY + ".png"),
    figures={"steering": figure},
    section=Section("steering", "Steering", "Steering",
                    (f"{ANALYSIS_DIR}/{_ANY}.json",), _render),
    suite=_suite)
