"""``moetrace toy train|sweep|reproduce``: seed 001's toy model of superposition in MoE (see engine/toy/).

Defaults are Chaudhari et al.'s design everywhere (moetrace.toy.reproduce.CHAUDHARI_SOURCE): n = 100
features, uniform importance, 10,000 steps of batch 1024, AdamW lr 1e-3 constant.
"""

from __future__ import annotations

from moetrace.commands._help import add_command
from moetrace.errors import MoetraceError


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 120


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MoetraceError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise MoetraceError(f"expected comma-separated numbers, got {text!r}") from None


def _common(p) -> None:
    p.add_argument("--features", type=int, default=100, help="n_features F (default 100)")
    p.add_argument("--importance-decay", type=float, default=1.0,
                   help="importance_f = decay ** f (default 1: uniform, as Chaudhari et al.)")
    p.add_argument("--load-balancing", action="store_true", help="add the load-balancing loss 0.01 * E * sum f_e P_e")
    p.add_argument("--gate-init", choices=("xavier", "disjoint", "identity"), default="xavier",
                   help="router initialization: xavier (default), disjoint feature blocks, or identity")
    p.add_argument("--steps", type=int, default=10_000, help="training steps (default 10000)")
    p.add_argument("--batch", type=int, default=1024, help="inputs per step (default 1024)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="constant",
                   help="learning-rate schedule (default constant)")
    p.add_argument("--print-freq", type=int, default=1000, help="log the loss every N steps (default 1000)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: a GPU when there is one)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: toy models are too small to gain from more, and on a "
                        "shared machine extra threads mostly spin)")
    p.add_argument("--quiet", action="store_true", help="no step logs")
    p.add_argument("--out", required=True, help="output directory")


def add_parser(subparsers) -> None:
    top = add_command(subparsers, "toy", help="seed 001's toy MoE of superposition: train one model, sweep many, or "
                                              "reproduce Chaudhari et al. / Elhage et al. in their designs",
                      examples=["toy train --out toy_run", "toy reproduce chaudhari --quick --out chaudhari"])
    sub = top.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")

    t = add_command(sub, "train", help="train one toy MoE; write model.safetensors, metrics.json, features.png",
                    examples=["toy train --experts 4 --active 1 --hidden 5 --feature-probability 0.1 --out toy_run"])
    _common(t)
    t.add_argument("--hidden", type=int, default=5, help="n_hidden H per expert (default 5)")
    t.add_argument("--experts", type=int, default=4, help="n_experts E (default 4)")
    t.add_argument("--active", type=int, default=1, help="n_active_experts k (default 1)")
    t.add_argument("--feature-probability", type=float, default=0.1,
                   help="probability that a feature is present in an input (default 0.1)")
    t.add_argument("--shuffle-importance", action="store_true",
                   help="assign the importances to features in a random order (seed 001 does)")
    t.add_argument("--no-renormalize", action="store_true", help="keep raw softmax weights of the top-k")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    t.set_defaults(func=run_train)

    s = add_command(sub, "sweep", help="train a grid of toy MoEs at once; write sweep.csv/.parquet and phase diagrams",
                    examples=["toy sweep --experts 1,4 --active 1,2 --feature-probability 0.5,0.1 --steps 2000 "
                              "--out sweep"])
    _common(s)
    size = s.add_mutually_exclusive_group()
    size.add_argument("--hidden", type=int, default=None,
                      help="n_hidden H per expert (then active capacity k * H grows with k)")
    size.add_argument("--total-hidden", type=int, default=None,
                      help="total hidden size E * H, split over the experts (default 20: Chaudhari et al.'s fixed "
                           "total capacity)")
    s.add_argument("--experts", default="1,4,10,20", help="comma-separated n_experts values (default 1,4,10,20)")
    s.add_argument("--active", default="1,2,5", help="comma-separated k values (pairs with k > E are skipped; "
                                                     "default 1,2,5)")
    s.add_argument("--feature-probability", default=None,
                   help="comma-separated feature probabilities (default: Chaudhari et al.'s 30 from 1.0 to 0.1)")
    s.add_argument("--seeds", default="0", help="comma-separated seeds (one model per seed per grid point)")
    s.add_argument("--pad-experts", action="store_true",
                   help="train all models as one padded group instead of one group per E")
    s.set_defaults(func=run_sweep_cmd)

    r = add_command(sub, "reproduce", help="rerun a paper in its own design: chaudhari (features per dimension, "
                                           "phase diagrams) or elhage (dimensionality plateaus)",
                    examples=["toy reproduce chaudhari --quick --out chaudhari",
                              "toy reproduce elhage --seeds 3 --out elhage"])
    r.add_argument("paper", choices=("chaudhari", "elhage"),
                   help="chaudhari: Chaudhari et al. (features per dimension, phase diagrams); elhage: Elhage et al.'s "
                        "dimensionality plateaus")
    r.add_argument("--quick", action="store_true",
                   help="fewer points, steps and seeds (minutes on 2 CPU cores); the model, data, loss and "
                        "metric stay the paper's")
    r.add_argument("--seeds", type=int, default=None,
                   help="runs per point (default: the design's, 3 for features per dimension and Elhage; for the "
                        "phase diagrams: models per cell, of which the lowest loss is kept, default 10)")
    r.add_argument("--steps", type=int, default=None, help="override the design's training steps")
    r.add_argument("--part", choices=("all", "features", "phase"), default="all",
                   help="chaudhari only: features per dimension, phase diagrams, or both (default)")
    r.add_argument("--device", default=None, help="cpu, cuda, ... (default: a GPU when there is one)")
    r.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    r.add_argument("--quiet", action="store_true", help="no step logs")
    r.add_argument("--out", required=True, help="output directory")
    r.set_defaults(func=run_reproduce_cmd)
    top.set_defaults(func=lambda args: (top.print_help(), 2)[1])


def _setup(args):
    import logging

    if not args.quiet:
        logger = logging.getLogger("moetrace.toy")
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    from pathlib import Path

    import torch

    if args.threads < 1:
        raise MoetraceError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _positive(args, names) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MoetraceError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def run_train(args) -> int:
    import json

    import torch
    from safetensors.torch import save_file

    from moetrace.toy import (SCHEDULES, Config, MoEModel, expert_feat_dimensionality, feature_specialization,
                              global_feature_dimensionality, most_monosemantic, optimize, weighted_global_dim)
    from moetrace.toy.metrics import REPRESENTED_THRESHOLD, features_per_dimension, global_dimensionality, routing_usage
    from moetrace.toy.model import fresh_step
    from moetrace.toy.plots import render_features

    _positive(args, ["features", "hidden", "steps", "batch", "print_freq"])
    out = _setup(args)
    F = args.features
    cfg = Config(F, args.hidden, args.experts, args.active, args.load_balancing,
                 renormalize=not args.no_renormalize, gate_init=args.gate_init)
    if not 0 < args.feature_probability <= 1:
        raise MoetraceError(f"--feature-probability must be in (0, 1], got {args.feature_probability}")
    decay = args.importance_decay
    order = torch.arange(F)
    if args.shuffle_importance:
        order = torch.randperm(F, generator=torch.Generator().manual_seed(args.seed))
    importance = decay ** order.to(torch.float64)
    model = MoEModel(cfg, torch.tensor(args.feature_probability), importance, device=args.device, seed=args.seed)
    steps = args.steps
    hist = optimize(model, n_batch=args.batch, steps=steps, print_freq=args.print_freq,
                    lr=args.lr, lr_scale=SCHEDULES[args.schedule])
    x = model.training_batch(fresh_step(steps, args.batch, 4096), 4096)  # inputs the training never saw
    usage, glob = global_feature_dimensionality(model, x)
    with torch.no_grad():
        weights, top_idx, _ = model.route(x)
        active = torch.zeros_like(weights).scatter(-1, top_idx, 1.0)
        represented_glob = global_dimensionality(model.W_experts.detach(), x, active)
        fpd = float(features_per_dimension(model.W_experts.detach(), routing_usage(weights, x), cfg.n_active_experts))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"config": json.dumps(cfg.__dict__), "seed": str(args.seed)})
    metrics = {
        "config": cfg.__dict__, "seed": args.seed, "feature_probability": args.feature_probability,
        "importance": importance.tolist(), "steps": steps,
        "final_reconstruction_loss": float(hist["reconstruction_loss"][-max(1, steps // 10):].mean()),
        "features_per_dimension": fpd,
        "global_dimensionality_given_present": represented_glob.tolist(),
        "n_features_represented": int((represented_glob > REPRESENTED_THRESHOLD).sum()),
        "seed_top1_usage": usage.tolist(), "seed_global_feature_dimensionality": glob.tolist(),
        "weighted_global_dim": weighted_global_dim(model).tolist(),
        "expert_feat_dimensionality": expert_feat_dimensionality(model).tolist(),
        "feature_specialization": feature_specialization(model).tolist(),
        "most_monosemantic": most_monosemantic(model.W_experts.detach()).tolist(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    render_features(model.W_experts, out / "features.png",
                    title=f"E={cfg.n_experts}, k={cfg.n_active_experts}, p={args.feature_probability}, seed={args.seed}")
    last = max(1, steps // 10)
    print(f"features represented: {metrics['n_features_represented']} of {F}; features per dimension {fpd:.3f}; "
          f"final reconstruction loss {metrics['final_reconstruction_loss']:.6f} (mean over the last {last:,} steps' "
          "batches; a logged step's loss is one batch's, so it scatters around this)")
    print(f"wrote {out / 'model.safetensors'}, {out / 'metrics.json'}, {out / 'features.png'}")
    return 0


def run_sweep_cmd(args) -> int:
    from safetensors.torch import save_file

    from moetrace.toy.plots import phase_diagrams
    from moetrace.toy.reproduce import PAPER_PROBABILITIES
    from moetrace.toy.sweep import grid, run_sweep

    _positive(args, ["features", "hidden", "total_hidden", "steps", "batch", "print_freq"])
    out = _setup(args)
    probs = _floats(args.feature_probability) if args.feature_probability else list(PAPER_PROBABILITIES)
    total = None if args.hidden is not None else (args.total_hidden or 20)
    specs = grid(args.features, args.hidden, _ints(args.experts), _ints(args.active), probs, args.importance_decay,
                 args.load_balancing, _ints(args.seeds), args.gate_init, total_hidden=total)
    table, models = run_sweep(specs, steps=args.steps, n_batch=args.batch, lr=args.lr,
                              schedule=args.schedule, print_freq=args.print_freq, device=args.device,
                              group_by_experts=not args.pad_experts)
    table.to_csv(out / "sweep.csv", index_label="model")
    table.to_parquet(out / "sweep.parquet")
    save_file({f"{name}_group{g}": getattr(m, name).detach().cpu().contiguous()
               for g, m in enumerate(models) for name in ("W_experts", "b_final", "gate")},
              str(out / "weights.safetensors"))
    phase_diagrams(table, out / "phase_diagrams.png")
    secs = sum(table.groupby("group")["train_seconds_group"].first())
    print(f"{len(table)} models in {len(models)} group(s), trained in {secs:.1f} s")
    print(f"wrote {out / 'sweep.csv'}, {out / 'sweep.parquet'}, {out / 'weights.safetensors'}, "
          f"{out / 'phase_diagrams.png'}")
    return 0


def run_reproduce_cmd(args) -> int:
    import json
    from dataclasses import asdict, replace

    import pandas as pd

    from moetrace.toy import plots, reproduce

    _positive(args, ["seeds", "steps"])
    out = _setup(args)
    tweaks = {k: v for k, v in (("seeds", args.seeds), ("steps", args.steps)) if v is not None}
    written = []
    if args.paper == "chaudhari":
        record = {"source": reproduce.CHAUDHARI_SOURCE, "quick": args.quick}
        if args.part in ("all", "features"):
            design = reproduce.ChaudhariDesign()
            design = replace(design.quick() if args.quick else design, **tweaks)
            record["features_per_dimension"] = asdict(design)
            table = reproduce.run_chaudhari(design, device=args.device)
            summary = reproduce.chaudhari_summary(table)
            claims = reproduce.chaudhari_claims(table)
            table.to_csv(out / "models.csv", index=False)
            summary.to_csv(out / "features_per_dimension.csv", index=False)
            pd.DataFrame(claims).to_csv(out / "claims.csv", index=False)
            plots.features_per_dimension_figure(summary, out / "features_per_dimension.png",
                                                f"{len(design.architectures)} architectures of total hidden size "
                                                f"{design.architectures[0].n_experts * design.architectures[0].n_hidden}, "
                                                f"n = {design.n_features}, {design.steps} steps, {design.seeds} seeds; "
                                                "bands: 95% interval over seeds")
            written += ["models.csv", "features_per_dimension.csv", "claims.csv", "features_per_dimension.png"]
            _print_claims(claims)
        if args.part in ("all", "phase"):
            design = reproduce.PhaseDesign()
            design = replace(design.quick() if args.quick else design,
                             **({"steps": args.steps} if args.steps else {}),
                             **({"models_per_cell": args.seeds} if args.seeds else {}))
            record["phase"] = asdict(design)
            phase = reproduce.run_phase(design, device=args.device)
            jumps = reproduce.phase_jumps(phase)
            phase.to_csv(out / "phase.csv", index=False)
            jumps.to_csv(out / "phase_jumps.csv", index=False)
            plots.phase_diagram_figure(phase, out / "phase_diagrams.png")
            written += ["phase.csv", "phase_jumps.csv", "phase_diagrams.png"]
            print(jumps.round(3).to_string(index=False))
    else:
        design = reproduce.ElhageDesign()
        design = replace(design.quick() if args.quick else design, **tweaks)
        record = {"source": reproduce.ELHAGE_SOURCE, "quick": args.quick, "design": asdict(design)}
        features, plateaus = reproduce.run_elhage(design, device=args.device)
        features.to_csv(out / "features.csv", index=False)
        plateaus.to_csv(out / "plateaus.csv", index=False)
        dims = plateaus.groupby("feature_probability")["dims_per_feature"].first().to_dict()
        plots.plateau_figure(features, dims, out / "plateaus.png", reproduce.ELHAGE_FRACTIONS,
                             f"dense toy model, n = {design.n_features}, m = {design.n_hidden}, {design.steps} steps, "
                             f"{design.seeds} seeds")
        written += ["features.csv", "plateaus.csv", "plateaus.png"]
        wide = plateaus.pivot(index="feature_probability", columns="fraction", values="features")
        print(wide[[str(f) for f in reproduce.ELHAGE_FRACTIONS]].sort_index(ascending=False).to_string())
    (out / "design.json").write_text(json.dumps(record, indent=1))
    print("wrote " + ", ".join(str(out / w) for w in written + ["design.json"]))
    return 0


def _print_claims(claims) -> None:
    for c in claims:
        if "dense_higher" in c:
            print(f"{c['architecture']}: dense - MoE features per dimension {c['mean_difference']:+.3f} on average; "
                  f"interval above 0 at {c['dense_higher']}, below 0 at {c['dense_lower']}, undecided at "
                  f"{c['undecided']} of {c['p_values']} p")
        else:
            print(f"Spearman rho(k/E, features per dimension) per p: median {c['rho_median']:+.2f} "
                  f"[{c['rho_min']:+.2f}, {c['rho_max']:+.2f}], > 0 at {c['rho_positive']} of {c['p_values']} p")
