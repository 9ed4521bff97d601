"""``moetrace toy train|sweep``: seed 001's toy model of superposition in MoE (see engine/toy/)."""

from __future__ import annotations

from engine.errors import MoetraceError


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
    p.add_argument("--features", type=int, default=None, help="n_features F")
    p.add_argument("--hidden", type=int, default=None, help="n_hidden H per expert")
    p.add_argument("--importance-decay", type=float, default=None, help="importance_f = decay ** f")
    p.add_argument("--load-balancing", action="store_true", help="add the load-balancing loss 0.01 * E * sum f_e P_e")
    p.add_argument("--gate-init", choices=("xavier", "disjoint", "identity"), default="xavier")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="inputs per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), default="constant")
    p.add_argument("--print-freq", type=int, default=None, help="log the loss every N steps")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: a GPU when there is one)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: toy models are too small to gain from more, and on a "
                        "shared machine extra threads mostly spin)")
    p.add_argument("--quiet", action="store_true", help="no step logs")
    p.add_argument("--out", required=True, help="output directory")


def add_parser(subparsers) -> None:
    top = subparsers.add_parser("toy", help="seed 001's toy MoE of superposition: train one model or sweep many")
    sub = top.add_subparsers(dest="toy_command", metavar="TOY_COMMAND")

    t = sub.add_parser("train", help="train one toy MoE; write model.safetensors, metrics.json, features.png")
    _common(t)
    t.add_argument("--experts", type=int, default=10)
    t.add_argument("--active", type=int, default=1, help="n_active_experts k")
    t.add_argument("--feature-probability", type=float, default=0.1)
    t.add_argument("--shuffle-importance", action="store_true",
                   help="assign the importances to features in a random order (seed 001 does)")
    t.add_argument("--no-renormalize", action="store_true", help="keep raw softmax weights of the top-k")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=run_train)

    s = sub.add_parser("sweep", help="train a grid of toy MoEs at once; write sweep.csv/.parquet and phase diagrams")
    _common(s)
    s.add_argument("--experts", default="1,2,4,8", help="comma-separated n_experts values")
    s.add_argument("--active", default="1,2,4,8", help="comma-separated k values (pairs with k > E are skipped)")
    s.add_argument("--feature-probability", default=None,
                   help="comma-separated feature probabilities (default: 10 log-spaced from 1 to 0.01)")
    s.add_argument("--seeds", default="0", help="comma-separated seeds (one model per seed per grid point)")
    s.add_argument("--pad-experts", action="store_true",
                   help="train all models as one padded group instead of one group per E")
    s.set_defaults(func=run_sweep_cmd)
    top.set_defaults(func=lambda args: (top.print_help(), 2)[1])


def _setup(args):
    import logging

    if not args.quiet:
        logger = logging.getLogger("engine.toy")
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

    from engine.toy import (SCHEDULES, Config, MoEModel, expert_feat_dimensionality, feature_specialization,
                            global_feature_dimensionality, most_monosemantic, optimize, weighted_global_dim)
    from engine.toy.metrics import REPRESENTED_THRESHOLD
    from engine.toy.model import fresh_step
    from engine.toy.plots import render_features

    _positive(args, ["features", "hidden", "steps", "batch", "print_freq"])
    out = _setup(args)
    F = args.features or 100
    cfg = Config(F, args.hidden or 10, args.experts, args.active, args.load_balancing,
                 renormalize=not args.no_renormalize, gate_init=args.gate_init)
    if not 0 < args.feature_probability <= 1:
        raise MoetraceError(f"--feature-probability must be in (0, 1], got {args.feature_probability}")
    decay = 0.9 if args.importance_decay is None else args.importance_decay
    order = torch.arange(F)
    if args.shuffle_importance:
        order = torch.randperm(F, generator=torch.Generator().manual_seed(args.seed))
    importance = decay ** order.to(torch.float64)
    model = MoEModel(cfg, torch.tensor(args.feature_probability), importance, device=args.device, seed=args.seed)
    steps = args.steps or 10_000
    hist = optimize(model, n_batch=args.batch or 1024, steps=steps, print_freq=args.print_freq or 1000,
                    lr=args.lr, lr_scale=SCHEDULES[args.schedule])
    fresh = fresh_step(steps, args.batch or 1024, 4096)  # inputs the training never saw
    usage, glob = global_feature_dimensionality(model, model.training_batch(fresh, 4096))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
              metadata={"config": json.dumps(cfg.__dict__), "seed": str(args.seed)})
    metrics = {
        "config": cfg.__dict__, "seed": args.seed, "feature_probability": args.feature_probability,
        "importance": importance.tolist(), "steps": steps,
        "final_reconstruction_loss": float(hist["reconstruction_loss"][-max(1, steps // 10):].mean()),
        "usage": usage.tolist(), "global_feature_dimensionality": glob.tolist(),
        "n_features_represented": int((glob > REPRESENTED_THRESHOLD).sum()),
        "weighted_global_dim": weighted_global_dim(model).tolist(),
        "expert_feat_dimensionality": expert_feat_dimensionality(model).tolist(),
        "feature_specialization": feature_specialization(model).tolist(),
        "most_monosemantic": most_monosemantic(model.W_experts.detach()).tolist(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    render_features(model.W_experts, out / "features.png",
                    title=f"E={cfg.n_experts}, k={cfg.n_active_experts}, p={args.feature_probability}, seed={args.seed}")
    print(f"features represented: {metrics['n_features_represented']} of {F}; "
          f"final reconstruction loss {metrics['final_reconstruction_loss']:.6f}")
    print(f"wrote {out / 'model.safetensors'}, {out / 'metrics.json'}, {out / 'features.png'}")
    return 0


def run_sweep_cmd(args) -> int:
    import numpy as np
    from safetensors.torch import save_file

    from engine.toy.plots import phase_diagrams
    from engine.toy.sweep import grid, run_sweep

    _positive(args, ["features", "hidden", "steps", "batch", "print_freq"])
    out = _setup(args)
    probs = (_floats(args.feature_probability) if args.feature_probability
             else [float(v) for v in np.round(np.logspace(0, -2, 10), 5)])
    specs = grid(args.features or 20, args.hidden or 5, _ints(args.experts), _ints(args.active), probs,
                 1.0 if args.importance_decay is None else args.importance_decay, args.load_balancing,
                 _ints(args.seeds), args.gate_init)
    table, models = run_sweep(specs, steps=args.steps or 3000, n_batch=args.batch or 256, lr=args.lr,
                              schedule=args.schedule, print_freq=args.print_freq or 500, device=args.device,
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
