"""The seed-003 thesis toolkit on the command line (functions in :mod:`moetrace.analysis`, figures
in :mod:`moetrace.figures`). Every command takes ``--layers L [L ...]``, ``--num-tokens N`` and
``--out DIR`` and writes its numbers (CSV, and JSON or a Zarr dataset) and its figure (PNG and PDF)
into DIR; ``moetrace report RUN`` shows them when DIR is ``RUN/analysis``.

From a trace store:
    moetrace decisiveness trace.zarr --layers 0 2 --num-tokens 100000 --out run/analysis   # needs capture --probs
    moetrace router-metrics trace.zarr --by domain --out run/analysis
    moetrace lang-domain trace.zarr --out run/analysis                                      # labels domain + lang
    moetrace profile trace.zarr --layers 1 --expert 9 --out run/analysis
From a model (``--model demo`` = the cached demo model and, without ``--data``, its corpus):
    moetrace router-stats --model demo --layers 0 3 --num-tokens 100000 --out run/analysis
    moetrace similarity --model demo --layers 1 --num-tokens 10000 --out run/analysis
    moetrace dim-reduc --model demo --layers 1 --num-tokens 10000 [--method umap|pca] --out run/analysis
    moetrace steer --model demo --prompt "..." --layers 1 --expert 9 --scale 0 --target-idx 4 --out run/analysis
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moetrace.errors import MoetraceError
from moetrace.models.loading import MODEL_HELP, load_model


def _common(p, store: bool = True, layers_help: str = "layer ids (default: all MoE layers)",
            model: bool = False) -> None:
    if store:
        p.add_argument("store", nargs="?" if model else None,
                       help="trace store (.zarr)" + (" with routing/probs, or give --model" if model else ""))
    if model or not store:
        p.add_argument("--model", required=not store,
                       help=MODEL_HELP + (" (captured with probs into OUT/probs.zarr)" if store else ""))
        p.add_argument("--data", default=None, help="JSONL, one sequence per line ({\"text\"} or {\"input_ids\"}); "
                                                    "default with --model demo: the demo corpus")
        p.add_argument("--labels", default=None,
                       help="comma-separated label fields of each line for groups (default: none; demo: domain,lang)")
        p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="L", help=layers_help)
    p.add_argument("--num-tokens", type=int, default=None, metavar="N", help="use the first N tokens")
    p.add_argument("--out", default="analysis", help="output directory (default: ./analysis)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("decisiveness", help="router entropy / log E and top-k mass per layer (routing/probs)")
    _common(p, model=True)
    p.add_argument("--by", default=None, help="comma-separated labels for groups (default: all labels)")
    p.add_argument("--bins", type=int, default=200)
    p.set_defaults(func=run_decisiveness)

    p = subparsers.add_parser("router-metrics", help="selection frequency, domain specialization, token overlap")
    _common(p)
    p.add_argument("--by", default=None, help="comma-separated labels for groups (default: all labels)")
    p.set_defaults(func=run_router_metrics)

    p = subparsers.add_parser("lang-domain", help="per-layer divergence between groups, split by language and domain")
    _common(p)
    p.add_argument("--by", default=None, help="comma-separated labels (default: all labels; the split needs "
                                              "domain and lang)")
    p.set_defaults(func=run_lang_domain)

    p = subparsers.add_parser("profile", help="JSON profile of one expert at each of --layers")
    _common(p, layers_help="layer ids (one profile each)")
    p.add_argument("--expert", type=int, required=True)
    p.add_argument("--model", default=None, help="checkpoint whose tokenizer decodes token ids ('demo' works)")
    p.add_argument("--top-tokens", type=int, default=20)
    p.add_argument("--contexts", type=int, default=5)
    p.add_argument("--window", type=int, default=8)
    p.set_defaults(func=run_profile)

    p = subparsers.add_parser("router-stats", help="distributions of router logits, probabilities, top-k weights")
    _common(p, store=False)
    p.add_argument("--bins", type=int, default=100)
    p.set_defaults(func=run_router_stats)

    p = subparsers.add_parser("similarity", help="cosine and linear CKA between all experts' outputs, and weights")
    _common(p, store=False)
    p.add_argument("--experts", type=int, nargs="+", default=None, help="expert ids to compare (default: all)")
    p.set_defaults(func=run_similarity)

    p = subparsers.add_parser("dim-reduc", help="2-D UMAP (PCA fallback) of the routed experts' outputs")
    _common(p, store=False)
    p.add_argument("--method", default="auto", choices=["auto", "umap", "pca"])
    p.set_defaults(func=run_dim_reduc)

    p = subparsers.add_parser("steer", help="boost or ablate one expert for a prompt: text and next-token change")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer)")
    g.add_argument("--prompt-ids", type=int, nargs="+", help="prompt token ids")
    p.add_argument("--layers", type=int, nargs="+", required=True, metavar="L")
    p.add_argument("--expert", type=int, required=True)
    p.add_argument("--scale", type=float, default=0.0, help="factor on the routing weight (0 ablates; default 0)")
    p.add_argument("--logit", type=float, default=0.0, help="added to the expert's router logit (default 0)")
    p.add_argument("--target-idx", type=int, default=-1, help="prompt position whose next token is compared")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--num-tokens", type=int, default=None, help="cut the prompt to N tokens")
    p.add_argument("--out", default="analysis")
    p.set_defaults(func=run_steer)


# ------------------------------------------------------------------------------------ helpers


def _out(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _save(out: Path, name: str, fig=None, table=None, dataset=None, data: Any = None) -> None:
    from moetrace.analysis.suite import write_outputs

    written = write_outputs(out, name, fig, table, dataset, data)
    print(f"wrote {', '.join(str(w) for w in written)}")


def _labels(arg: str | None, store) -> list[str]:
    return store.label_names if arg is None else [x for x in arg.split(",") if x]


def _select_layers(ds, layers):
    if layers is None:
        return ds
    have = ds["layer"].values.tolist()
    missing = [l for l in layers if l not in have]
    if missing:
        raise MoetraceError(f"--layers: {missing} not recorded (have {have})")
    return ds.sel(layer=list(layers))


def _store(args):
    from moetrace.store import TraceStore

    if not Path(args.store).exists():
        raise MoetraceError(f"{args.store}: no such trace store")
    return TraceStore.open(args.store)


def _counts(args, stats):
    from moetrace.counting import count_range
    from moetrace.analysis._common import row_range

    st = _store(args)
    start, stop = row_range(st, args.num_tokens)
    return st, count_range(st, start, stop, stats=stats, by=_labels(args.by, st), progress=False)


def _batches(args, model, tokenizer):
    """Token batches of --data (or the demo corpus) until --num-tokens."""
    from moetrace.analysis._common import token_batches

    if args.data is None:
        if args.model != "demo":
            raise MoetraceError("--data: required unless --model demo")
        from moetrace.demo.data import make_training_documents

        want = args.num_tokens or 20_000
        rows = make_training_documents(max(8, want // 20), seed=1)  # ~25 tokens each; extended below
        labels = ["domain", "lang"] if args.labels is None else [x for x in args.labels.split(",") if x]
    else:
        from moetrace.commands.capture import read_jsonl

        labels = [x for x in (args.labels or "").split(",") if x]
        rows = read_jsonl(Path(args.data), labels)
    if any("input_ids" not in r for r in rows) and tokenizer is None:
        raise MoetraceError(f"--model {args.model}: lines have 'text' but the model has no tokenizer")
    ids = [r["input_ids"] if "input_ids" in r else tokenizer(r["text"])["input_ids"] for r in rows]
    groups = ["/".join(str(r[l]) for l in labels) if labels else "all" for r in rows]
    if args.data is None and args.num_tokens:
        total = sum(len(x) for x in ids)
        if total < args.num_tokens:  # more demo documents from further seeds
            from moetrace.demo.data import make_training_documents

            seed = 2
            while total < args.num_tokens:
                more = make_training_documents(max(8, (args.num_tokens - total) // 20), seed=seed)
                ids += [tokenizer(r["text"])["input_ids"] for r in more]
                groups += [f"{r['domain']}/{r['lang']}" for r in more]
                total = sum(len(x) for x in ids)
                seed += 1
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (model.config.pad_token_id or 0)
    return lambda: token_batches(ids, batch_size=args.batch_size, num_tokens=args.num_tokens, pad_id=pad,
                                 groups=groups)


# ------------------------------------------------------------------------------------ commands


def run_decisiveness(args) -> int:
    from moetrace import figures
    from moetrace.analysis import decisiveness
    from moetrace.analysis.decisiveness import table

    if (args.store is None) == (args.model is None):
        raise MoetraceError("decisiveness: give either a trace store or --model (with --data)")
    if args.model is not None:
        from moetrace.analysis.suite import capture_probs
        from moetrace.store import TraceStore

        model, tokenizer = load_model(args.model)
        st = TraceStore.open(capture_probs(model, _batches(args, model, tokenizer)(), _out(args) / "probs.zarr"))
    else:
        st = _store(args)
    ds = decisiveness(st, layers=args.layers, num_tokens=args.num_tokens, by=_labels(args.by, st), bins=args.bins)
    _save(_out(args), "decisiveness", figures.decisiveness(ds), table(ds), dataset=ds)
    return 0


def run_router_metrics(args) -> int:
    from moetrace import figures
    from moetrace.analysis import router_metrics
    from moetrace.analysis.router_metrics import table

    _, counts = _counts(args, ["experts", "coact"])
    ds = _select_layers(router_metrics(counts), args.layers)
    out = _out(args)
    _save(out, "router_metrics", None, table(ds), dataset=ds)
    for layer in ds["layer"].values.tolist():
        _save(out, f"router_metrics_layer{layer}", figures.router_metrics(ds, layer))
    return 0


def run_lang_domain(args) -> int:
    from moetrace import figures
    from moetrace.analysis import jensen_shannon
    from moetrace.analysis.lang_domain import table

    _, counts = _counts(args, ["experts"])
    ds = _select_layers(jensen_shannon(counts), args.layers)
    _save(_out(args), "lang_domain", figures.lang_domain(ds), table(ds), dataset=ds)
    return 0


def run_profile(args) -> int:
    from moetrace.analysis import expert_profile

    st = _store(args)
    decode = None
    if args.model is not None:
        _, tokenizer = load_model(args.model)
        decode = tokenizer.decode if tokenizer is not None else None
    out = _out(args)
    for layer in args.layers if args.layers is not None else st.layer_ids.tolist():
        prof = expert_profile(st, layer, args.expert, num_tokens=args.num_tokens, top_tokens=args.top_tokens,
                              contexts=args.contexts, window=args.window, decode=decode)
        _save(out, f"profile_layer{layer}_expert{args.expert}", data=prof)
    return 0


def run_router_stats(args) -> int:
    from moetrace import figures
    from moetrace.analysis import router_stats
    from moetrace.analysis.router_stats import table

    model, tokenizer = load_model(args.model)
    ds = router_stats(model, _batches(args, model, tokenizer)(), layers=args.layers, bins=args.bins)
    _save(_out(args), "router_stats", figures.router_stats(ds), table(ds), dataset=ds)
    return 0


def run_similarity(args) -> int:
    from moetrace import figures
    from moetrace.analysis import expert_similarity, weight_similarity

    model, tokenizer = load_model(args.model)
    ds = expert_similarity(model, _batches(args, model, tokenizer)(), layers=args.layers, experts=args.experts)
    w = weight_similarity(model, args.layers)
    if args.experts is not None:
        w = w.sel(expert=args.experts, other_expert=args.experts)
    ds = ds.merge(w)
    out = _out(args)
    table = ds.to_dataframe().reset_index()
    _save(out, "similarity", None, table, dataset=ds)
    for layer in ds["layer"].values.tolist():
        _save(out, f"similarity_layer{layer}", figures.similarity(ds, layer))
    return 0


def run_dim_reduc(args) -> int:
    from moetrace import figures
    from moetrace.analysis import reduce_2d

    model, tokenizer = load_model(args.model)
    make = _batches(args, model, tokenizer)
    from moetrace.analysis._common import experts_modules

    layers = args.layers if args.layers is not None else sorted(experts_modules(model))
    out = _out(args)
    for layer in layers:
        points = reduce_2d(model, make(), layer, method=args.method)
        name = f"dim_reduc_layer{layer}"
        _save(out, name, figures.embedding(points), points, data=dict(points.attrs))
    return 0


def run_steer(args) -> int:
    from moetrace import figures
    from moetrace.analysis import steer_prompt

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
    name = f"steer_layers{'-'.join(map(str, args.layers))}_expert{args.expert}"
    print(f"prompt: {res['prompt']}\nbefore: {res['before']['generated']}\nafter:  {res['after']['generated']}")
    print(f"next token after position {res['next_token']['position']}: KL {res['next_token']['kl']:.4g}, "
          f"TV {res['next_token']['tv']:.4g}")
    for t in res["next_token"]["tokens"][:10]:
        print(f"  {t['text']!r:>16} {t['p_before']:.4f} -> {t['p_after']:.4f} ({t['change']:+.4f})")
    _save(_out(args), name, figures.steering(res), data=res)
    return 0
