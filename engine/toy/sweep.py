"""Sweeps: a grid of toy MoEs trained in batched groups, one tidy row per model.

A sweep is a list of :class:`Spec` (one per model). :func:`run_sweep` trains them as
:class:`engine.toy.batched.BatchedMoE` instances: by default one group per distinct number of
experts ``E`` (no padding, so an ``E = 1`` model does not pay for 8 experts); with
``group_by_experts=False`` all in one group, padded to the largest ``E`` and masked. Results are
identical either way up to floating-point summation order (each instance's data and init depend
only on its own seed).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass
from typing import Sequence

import pandas as pd
import torch

from engine.errors import MoetraceError
from engine.toy.batched import BatchedMoE, train_batched
from engine.toy.metrics import summary
from engine.toy.model import SCHEDULES, Config, feature_batch, fresh_step

log = logging.getLogger("engine.toy")


@dataclass(frozen=True)
class Spec:
    """One model of a sweep. ``importance_f = importance_decay ** f`` (1.0: uniform)."""

    n_features: int
    n_hidden: int
    n_experts: int
    n_active_experts: int
    feature_probability: float
    importance_decay: float = 1.0
    load_balancing_loss: bool = False
    seed: int = 0
    gate_init: str = "xavier"
    renormalize: bool = True

    def config(self) -> Config:
        return Config(self.n_features, self.n_hidden, self.n_experts, self.n_active_experts,
                      self.load_balancing_loss, renormalize=self.renormalize, gate_init=self.gate_init)

    def importance(self) -> torch.Tensor:
        return self.importance_decay ** torch.arange(self.n_features, dtype=torch.float64)


def grid(n_features: int, n_hidden: int, experts: Sequence[int], active: Sequence[int],
         feature_probabilities: Sequence[float], importance_decay: float = 1.0, load_balancing_loss: bool = False,
         seeds: Sequence[int] = (0,), gate_init: str = "xavier") -> list[Spec]:
    """Every (E, k, p, seed) with ``k <= E``; the model's seed is ``seed * 1_000_003 + its index``
    so no two models share a data stream."""
    specs = []
    for E, k, p, s in itertools.product(experts, active, feature_probabilities, seeds):
        if k > E:
            continue
        if not 0 < p <= 1:
            raise MoetraceError(f"toy sweep: feature probabilities must be in (0, 1], got {p}")
        specs.append(Spec(n_features, n_hidden, int(E), int(k), float(p), float(importance_decay),
                          bool(load_balancing_loss), int(s) * 1_000_003 + len(specs), gate_init))
    if not specs:
        raise MoetraceError("toy sweep: the grid is empty (every n_active_experts > n_experts?)")
    return specs


def build(specs: Sequence[Spec], device=None, dtype=torch.float32) -> BatchedMoE:
    return BatchedMoE([s.config() for s in specs], [s.feature_probability for s in specs],
                      [s.importance() for s in specs], [s.seed for s in specs], device=device, dtype=dtype)


def run_sweep(specs: Sequence[Spec], steps: int = 3000, n_batch: int = 1024, lr: float = 1e-3,
              schedule: str = "constant", print_freq: int = 500, device=None, group_by_experts: bool = True,
              usage_batch: int = 4096, dtype=torch.float32):
    """Train every spec; return ``(table, models)``.

    table: one row per spec (in order) with its parameters, ``network_sparsity = k / E``,
    ``feature_sparsity = 1 - p``, ``final_loss`` (mean reconstruction loss over the last 10% of steps),
    ``final_load_balance_loss``, ``group``/``instance`` (where it sits in ``models``) and every
    metric of :func:`engine.toy.metrics.summary`, computed on ``usage_batch`` fresh inputs (step
    ``steps`` of each model's stream, never trained on). models: the trained
    :class:`BatchedMoE` groups.
    """
    if schedule not in SCHEDULES:
        raise MoetraceError(f"toy sweep: schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    specs = list(specs)
    if group_by_experts:
        keys = sorted({s.n_experts for s in specs})
        groups = [[i for i, s in enumerate(specs) if s.n_experts == E] for E in keys]
    else:
        groups = [list(range(len(specs)))]
    rows: list[dict | None] = [None] * len(specs)
    models = []
    tail = max(1, steps // 10)
    for g, members in enumerate(groups):
        model = build([specs[i] for i in members], device=device, dtype=dtype)
        log.info("group %d: %d models, E = %d", g, len(members), model.W_experts.shape[1])
        hist = train_batched(model, n_batch=n_batch, steps=steps, print_freq=print_freq, lr=lr,
                             lr_scale=SCHEDULES[schedule])
        with torch.no_grad():
            x = feature_batch(model.seed_tensor, fresh_step(steps, n_batch, usage_batch), usage_batch,
                              model.feature_probability, dtype)
            metrics = {k: v.cpu().tolist() for k, v in
                       summary(model.W_experts, model.gate, x, model.expert_mask).items()}
        final = hist["reconstruction_loss"][-tail:].mean(0).tolist()
        final_lb = hist["load_balance_loss"][-tail:].mean(0).tolist()
        for j, i in enumerate(members):
            s = specs[i]
            row = asdict(s)
            row.update(network_sparsity=s.n_active_experts / s.n_experts, feature_sparsity=1 - s.feature_probability,
                       steps=steps, n_batch=n_batch, lr=lr, schedule=schedule, group=g, instance=j,
                       final_loss=final[j], final_load_balance_loss=final_lb[j], train_seconds_group=hist["seconds"])
            row.update({k: v[j] for k, v in metrics.items()})
            rows[i] = row
        models.append(model)
    return pd.DataFrame(rows), models
