"""Sweeps: a grid of toy MoEs trained in batched groups, one tidy row per model.

A sweep is a list of :class:`Spec` (one per model). :func:`run_sweep` trains them as
:class:`moetrace.toy.batched.BatchedMoE` instances: by default one group per distinct number of
experts ``E`` (no padding, so an ``E = 1`` model does not pay for 8 experts); with
``group_by_experts=False`` all models of one hidden size in one group, padded to the largest ``E``
and masked. Results are
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

from moetrace.errors import MoetraceError
from moetrace.toy.batched import BatchedMoE, train_batched
from moetrace.toy.metrics import summary
from moetrace.toy.model import SCHEDULES, Config, feature_batch, fresh_step

log = logging.getLogger("moetrace.toy")


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


def grid(n_features: int, n_hidden: int | None, experts: Sequence[int], active: Sequence[int],
         feature_probabilities: Sequence[float], importance_decay: float = 1.0, load_balancing_loss: bool = False,
         seeds: Sequence[int] = (0,), gate_init: str = "xavier", total_hidden: int | None = None) -> list[Spec]:
    """Every (E, k, p, seed) with ``k <= E``; the model's seed is ``seed * 1_000_003 + its index``
    so no two models share a data stream.

    Hidden size: ``n_hidden`` per expert (active capacity ``k * n_hidden`` grows with k), or, with
    ``n_hidden=None``, ``total_hidden / E`` per expert so that every model has the same total hidden
    size (Chaudhari et al.'s design; ``total_hidden`` must be divisible by every E).
    """
    if (n_hidden is None) == (total_hidden is None):
        raise MoetraceError("toy sweep: give exactly one of n_hidden (per expert) and total_hidden (split over E)")
    if total_hidden is not None:
        bad = [E for E in experts if E < 1 or total_hidden % E]
        if bad:
            raise MoetraceError(f"toy sweep: total hidden size {total_hidden} is not divisible by n_experts {bad}")
    specs = []
    for E, k, p, s in itertools.product(experts, active, feature_probabilities, seeds):
        if k > E:
            continue
        hidden = n_hidden if n_hidden is not None else total_hidden // E
        if not 0 < p <= 1:
            raise MoetraceError(f"toy sweep: feature probabilities must be in (0, 1], got {p}")
        specs.append(Spec(n_features, int(hidden), int(E), int(k), float(p), float(importance_decay),
                          bool(load_balancing_loss), int(s) * 1_000_003 + len(specs), gate_init))
    if not specs:
        raise MoetraceError("toy sweep: the grid is empty (every n_active_experts > n_experts?)")
    return specs


def build(specs: Sequence[Spec], device=None, dtype=torch.float32, feature_reduction: str = "sum") -> BatchedMoE:
    return BatchedMoE([s.config() for s in specs], [s.feature_probability for s in specs],
                      [s.importance() for s in specs], [s.seed for s in specs], device=device, dtype=dtype,
                      feature_reduction=feature_reduction)


def evaluate(model: BatchedMoE, steps: int, n_batch: int, usage_batch: int = 4096) -> dict[str, torch.Tensor]:
    """:func:`moetrace.toy.metrics.summary` of every instance, on ``usage_batch`` inputs of each model's
    own stream that a run of ``steps`` steps of ``n_batch`` never trained on."""
    with torch.no_grad():
        x = feature_batch(model.seed_tensor, fresh_step(steps, n_batch, usage_batch), usage_batch,
                          model.feature_probability, model.W_experts.dtype)
        weights, active, _ = model.route(x)
        return summary(model.W_experts, x, weights, active, model.expert_mask, model.n_active)


def run_sweep(specs: Sequence[Spec], steps: int = 10_000, n_batch: int = 1024, lr: float = 1e-3,
              schedule: str = "constant", print_freq: int = 500, device=None, group_by_experts: bool = True,
              usage_batch: int = 4096, dtype=torch.float32, feature_reduction: str = "sum"):
    """Train every spec; return ``(table, models)``.

    table: one row per spec (in order) with its parameters, ``network_sparsity = k / E``,
    ``feature_sparsity = 1 - p``, ``final_loss`` (mean reconstruction loss over the last 10% of steps),
    ``final_load_balance_loss`` (``feature_reduction``: see :class:`BatchedMoE`), ``group``/``instance`` (where it sits in ``models``) and every
    metric of :func:`moetrace.toy.metrics.summary`, computed on ``usage_batch`` fresh inputs (step
    ``steps`` of each model's stream, never trained on). models: the trained
    :class:`BatchedMoE` groups.
    """
    if schedule not in SCHEDULES:
        raise MoetraceError(f"toy sweep: schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
    specs = list(specs)
    # a group shares one hidden size; by default also one E (no padded experts)
    key = (lambda s: (s.n_hidden, s.n_experts)) if group_by_experts else (lambda s: (s.n_hidden,))
    groups = [[i for i, s in enumerate(specs) if key(s) == k] for k in sorted({key(s) for s in specs})]
    rows: list[dict | None] = [None] * len(specs)
    models = []
    tail = max(1, steps // 10)
    for g, members in enumerate(groups):
        model = build([specs[i] for i in members], device=device, dtype=dtype, feature_reduction=feature_reduction)
        log.info("group %d: %d models, E = %d", g, len(members), model.W_experts.shape[1])
        hist = train_batched(model, n_batch=n_batch, steps=steps, print_freq=print_freq, lr=lr,
                             lr_scale=SCHEDULES[schedule])
        metrics = {k: v.cpu().tolist() for k, v in evaluate(model, steps, n_batch, usage_batch).items()}
        final = hist["reconstruction_loss"][-tail:].mean(0).tolist()
        final_lb = hist["load_balance_loss"][-tail:].mean(0).tolist()
        for j, i in enumerate(members):
            s = specs[i]
            row = asdict(s)
            row.update(network_sparsity=s.n_active_experts / s.n_experts, feature_sparsity=1 - s.feature_probability,
                       steps=steps, n_batch=n_batch, lr=lr, schedule=schedule, feature_reduction=feature_reduction,
                       group=g, instance=j,
                       final_loss=final[j], final_load_balance_loss=final_lb[j], train_seconds_group=hist["seconds"])
            row.update({k: v[j] for k, v in metrics.items()})
            rows[i] = row
        models.append(model)
    return pd.DataFrame(rows), models
