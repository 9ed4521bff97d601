"""Seed 001's toy model of superposition in a Mixture of Experts: one model, its data and training.

The model (as in seed 001 and its ``model/model.py``):

- input ``x [B, F]``: each of ``F = n_features`` features is present with probability
  ``feature_probability`` (a scalar or one value per feature) and then uniform in ``[0, 1)``;
- router: ``gate [E, F]``, ``probs = softmax(x @ gate.T)`` over the ``E = n_experts`` experts,
  the top ``k = n_active_experts`` kept (ties to the lower index), their weights renormalized to sum to 1 (optional);
- expert ``e`` has tied weights ``W_experts[e] [F, H]`` and a bias ``b_final[e] [F]`` and
  reconstructs ``ReLU(x W_e W_e^T + b_e)``; every expert is computed densely and the outputs are
  combined by routing weight;
- loss: ``sum_f importance_f * mean_b (x_bf - out_bf)^2`` (mean over the batch, summed over
  features), plus, when enabled, the load-balancing loss ``0.01 * E * sum_e f_e P_e``
  (``f_e``: fraction of inputs dispatched to expert ``e`` after top-k, ``P_e``: mean router
  probability before top-k);
- AdamW (torch's default weight decay 0.01, as the seed), lr 1e-3, a constant / linear / cosine
  schedule.

Determinism: parameters are initialized on the CPU from ``seed`` (so CPU and GPU start alike) and
training batches come from :func:`feature_batch`, a counter-based stream keyed by
``(seed, step)``: the same on every device, and the same whether a model is trained alone or as
one instance of :class:`moetrace.toy.batched.BatchedMoE`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moetrace.errors import MoetraceError

log = logging.getLogger("moetrace.toy")

GATE_INITS = ("xavier", "disjoint", "identity")


@dataclass(frozen=True)
class Config:
    """Shape and routing of one toy MoE (the seed's five fields first).

    ``gate_init``: ``"xavier"`` (xavier-normal, the default), ``"disjoint"`` (zeros, then 1 at
    ``F // E`` random features per expert, no feature shared: the seed notebook's fixed gate) or
    ``"identity"`` (zeros with ``gate[e, e] = 1``, the seed's ``fill_diagonal_`` variant).
    """

    n_features: int
    n_hidden: int
    n_experts: int
    n_active_experts: int
    load_balancing_loss: bool = False
    renormalize: bool = True
    load_balancing_coef: float = 0.01
    gate_init: str = "xavier"

    def __post_init__(self):
        for name in ("n_features", "n_hidden", "n_experts", "n_active_experts"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise MoetraceError(f"toy Config: {name} must be a positive integer, got {value!r}")
        if self.n_active_experts > self.n_experts:
            raise MoetraceError(f"toy Config: n_active_experts must be <= n_experts ({self.n_experts}), "
                                f"got {self.n_active_experts}")
        if self.gate_init not in GATE_INITS:
            raise MoetraceError(f"toy Config: gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")
        if self.gate_init == "disjoint" and self.n_features < self.n_experts:
            raise MoetraceError(f"toy Config: gate_init='disjoint' needs n_features >= n_experts, "
                                f"got {self.n_features} < {self.n_experts}")


# ---------------------------------------------------------------- learning-rate schedules
def constant_lr(step: int, steps: int) -> float:
    return 1.0


def linear_lr(step: int, steps: int) -> float:
    return 1.0 - step / steps


def cosine_decay_lr(step: int, steps: int) -> float:
    return float(np.cos(0.5 * np.pi * step / max(steps - 1, 1)))


SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "constant": constant_lr, "linear": linear_lr, "cosine": cosine_decay_lr,
}


def default_device() -> torch.device:
    """A GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- data
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64 constants as signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 (wrapping multiplication, logical shifts)."""
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def fresh_step(steps: int, n_batch: int, batch: int) -> int:
    """The first step index at which a batch of ``batch`` rows draws only stream values that a training
    run of ``steps`` steps of ``n_batch`` rows never used (counters ``[0, steps * n_batch)``)."""
    return -(-steps * n_batch // batch)


def feature_batch(seeds: torch.Tensor, step: int, n_batch: int, feature_probability: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Training inputs ``[I, n_batch, F]`` for ``I`` models, a pure function of ``(seed, step)``.

    seeds: int64 ``[I]``. feature_probability: ``[I, F]`` (the number of features ``F`` comes
    from it). Element ``(i, b, f)`` is value ``(step * n_batch + b) * F + f`` of the splitmix64
    sequence started at ``seeds[i]``; its top 24 bits decide presence (``u < p``), the next 24 the
    value (uniform in ``[0, 1)``). Integer arithmetic only, so every device draws the same batch.
    """
    n_inst, n_feat = feature_probability.shape
    device = feature_probability.device
    counter = (step * n_batch + torch.arange(n_batch, device=device, dtype=torch.int64))[:, None] * n_feat \
        + torch.arange(n_feat, device=device, dtype=torch.int64)
    start = _mix64(seeds.to(device=device, dtype=torch.int64))
    z = _mix64(start[:, None, None] + (counter[None] + 1) * _GOLDEN)
    scale = 1.0 / (1 << 24)
    present = ((z >> 40) & 0xFFFFFF).to(dtype) * scale < feature_probability[:, None, :].to(dtype)
    value = ((z >> 16) & 0xFFFFFF).to(dtype) * scale
    return torch.where(present, value, torch.zeros((), dtype=dtype, device=device))


def per_feature(value, n_features: int, name: str) -> torch.Tensor:
    """A scalar / sequence / tensor as float64 ``[n_features]`` (CPU), checked."""
    t = torch.as_tensor(value if value is not None else 1.0, dtype=torch.float64).detach().cpu()
    if t.dim() == 0:
        t = t.expand(n_features).clone()
    if t.shape != (n_features,):
        raise MoetraceError(f"toy model: {name} must be a scalar or have {n_features} values, got shape "
                            f"{tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise MoetraceError(f"toy model: {name} must be finite and >= 0, got {t.tolist()[:5]}...")
    return t


# ---------------------------------------------------------------- model
def init_parameters(config: Config, seed: int, dtype: torch.dtype = torch.float32):
    """``(W_experts [E, F, H], b_final [E, F], gate [E, F])`` drawn on the CPU from ``seed``.

    All three xavier-normal (std ``sqrt(2 / (fan_in + fan_out))`` with torch's fans), then the gate
    replaced as ``config.gate_init`` says.
    """
    E, Fn, H = config.n_experts, config.n_features, config.n_hidden
    g = torch.Generator().manual_seed(int(seed))
    W = nn.init.xavier_normal_(torch.empty(E, Fn, H, dtype=torch.float64), generator=g)
    b = nn.init.xavier_normal_(torch.empty(E, Fn, dtype=torch.float64), generator=g)
    gate = nn.init.xavier_normal_(torch.empty(E, Fn, dtype=torch.float64), generator=g)
    if config.gate_init == "disjoint":
        per_expert = Fn // E
        chosen = torch.randperm(Fn, generator=g)[: E * per_expert].reshape(E, per_expert)
        gate = torch.zeros(E, Fn, dtype=torch.float64)
        gate[torch.arange(E)[:, None], chosen] = 1.0
    elif config.gate_init == "identity":
        gate = torch.zeros(E, Fn, dtype=torch.float64)
        gate.fill_diagonal_(1.0)
    return W.to(dtype), b.to(dtype), gate.to(dtype)


def top_k_indices(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[..., k]`` of the ``k`` largest ``probs [..., E]``; ties go to the lower expert index.

    (A stable sort, not ``torch.topk``, whose order among ties depends on the shape: an all-zero input
    gives every expert the same probability and must pick the same experts alone and in a sweep.)
    """
    return torch.sort(probs, dim=-1, descending=True, stable=True).indices[..., :k]


class MoEModel(nn.Module):
    """One toy MoE. ``MoEModel(config, feature_probability=None, importance=None, device=None)``.

    feature_probability, importance: scalar or ``[F]`` (default 1). device None: a GPU when there is
    one. seed None: drawn from torch's global generator (so ``torch.manual_seed`` fixes it).
    Parameters: ``W_experts [E, F, H]``, ``b_final [E, F]``, ``gate [E, F]``.
    """

    def __init__(self, config: Config, feature_probability=None, importance=None, device=None,
                 seed: int | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        device = torch.device(device) if device is not None else default_device()
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self.seed = int(seed)
        W, b, gate = init_parameters(config, self.seed, dtype)
        self.W_experts = nn.Parameter(W.to(device))
        self.b_final = nn.Parameter(b.to(device))
        self.gate = nn.Parameter(gate.to(device))
        self.register_buffer("feature_probability",
                             per_feature(feature_probability, config.n_features, "feature_probability")
                             .to(device=device, dtype=dtype))
        self.register_buffer("importance", per_feature(importance, config.n_features, "importance")
                             .to(device=device, dtype=dtype))
        self._generator = torch.Generator(device=device).manual_seed(self.seed)

    def route(self, features: torch.Tensor):
        """``features [..., F]`` -> ``(weights [..., E], top_k_indices [..., k], load_balance_loss or None)``."""
        cfg = self.config
        probs = F.softmax(torch.einsum("...f,ef->...e", features, self.gate), dim=-1)
        top_idx = top_k_indices(probs, cfg.n_active_experts)
        active = torch.zeros_like(probs).scatter(-1, top_idx, 1.0)
        lb = None
        if cfg.load_balancing_loss:
            lead = tuple(range(probs.dim() - 1))
            lb = cfg.load_balancing_coef * cfg.n_experts * (active.mean(lead) * probs.mean(lead)).sum()
        if cfg.renormalize:
            weights = torch.where(active.bool(), probs / (probs * active).sum(-1, keepdim=True),
                                  torch.zeros_like(probs))
        else:
            weights = probs * active
        return weights, top_idx, lb

    def forward(self, features: torch.Tensor):
        """``features [..., F]`` -> ``(reconstruction [..., F], load_balance_loss or None)``."""
        weights, _, lb = self.route(features)
        hidden = torch.einsum("...f,efh->...eh", features, self.W_experts)
        expert_out = F.relu(torch.einsum("...eh,efh->...ef", hidden, self.W_experts) + self.b_final)
        return torch.einsum("...e,...ef->...f", weights, expert_out), lb

    def generate_batch(self, n_batch: int) -> torch.Tensor:
        """A fresh ``[n_batch, F]`` batch from the model's own generator (seeded by ``seed``)."""
        dev, dt = self.W_experts.device, self.W_experts.dtype
        shape = (n_batch, self.config.n_features)
        value = torch.rand(shape, generator=self._generator, device=dev, dtype=dt)
        present = torch.rand(shape, generator=self._generator, device=dev, dtype=dt) <= self.feature_probability
        return torch.where(present, value, torch.zeros((), device=dev, dtype=dt))

    def training_batch(self, step: int, n_batch: int) -> torch.Tensor:
        """The ``[n_batch, F]`` batch :func:`optimize` uses at ``step`` (see :func:`feature_batch`)."""
        seeds = torch.tensor([self.seed], dtype=torch.int64)
        return feature_batch(seeds, step, n_batch, self.feature_probability[None], self.W_experts.dtype)[0]

    def losses(self, batch: torch.Tensor):
        """``(reconstruction loss, load-balancing loss)``, both 0-d (the second 0 when disabled)."""
        out, lb = self(batch)
        recon = self.reconstruction_loss(batch, out)
        return recon, torch.zeros_like(recon) if lb is None else lb

    def reconstruction_loss(self, batch: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``sum_f importance_f * mean_b (batch - out)^2`` (a 0-d tensor)."""
        return (self.importance * (batch - out) ** 2).mean(0).sum()


def log_step(step: int, recon: float, lb: float | None, lr: float, prefix: str = "") -> None:
    extra = f", load-balancing loss={lb:.6f}" if lb is not None else ""
    log.info("%sStep %d: Reconstruction loss=%.6f%s, lr=%.6f", prefix, step, recon, extra, lr)


def optimize(model: MoEModel, n_batch: int = 1024, steps: int = 10_000, print_freq: int = 100,
             lr: float = 1e-3, lr_scale: Callable[[int, int], float] = constant_lr,
             weight_decay: float = 0.01, callback: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` in place, as the seed's ``optimize``.

    Every ``print_freq`` steps (and at the last) logs ``Step N: Reconstruction loss=..., lr=...`` on
    the ``moetrace.toy`` logger (INFO) and calls ``callback(dict(step, reconstruction_loss,
    load_balance_loss, lr, model))`` when given. Returns ``{"reconstruction_loss": float64 [steps],
    "load_balance_loss": float64 [steps], "seconds": float}`` (zeros when the model has no
    load-balancing loss).
    """
    return train_loop(model, (), n_batch, steps, print_freq, lr, lr_scale, weight_decay, callback,
                      model.config.load_balancing_loss, "")


def train_loop(model, shape: tuple, n_batch: int, steps: int, print_freq: int, lr: float,
               lr_scale: Callable[[int, int], float], weight_decay: float, callback, has_lb: bool, prefix: str) -> dict:
    """AdamW on ``sum(recon + lb)`` of ``model.losses(model.training_batch(step, n_batch))``.

    ``shape``: the shape of the per-model losses (``()`` for one model, ``(I,)`` for a stack).
    Shared by :func:`optimize` and :func:`moetrace.toy.batched.train_batched`; see their docstrings.
    """
    if steps < 1 or n_batch < 1 or print_freq < 1:
        raise MoetraceError(f"toy training: steps, n_batch and print_freq must be >= 1, got "
                            f"{steps}, {n_batch}, {print_freq}")
    opt = torch.optim.AdamW(list(model.parameters()), lr=lr, weight_decay=weight_decay)
    dev = model.W_experts.device
    recon_hist = torch.zeros((steps, *shape), dtype=torch.float64, device=dev)
    lb_hist = torch.zeros_like(recon_hist)
    start = time.perf_counter()
    for step in range(steps):
        step_lr = lr * lr_scale(step, steps)
        for group in opt.param_groups:
            group["lr"] = step_lr
        opt.zero_grad(set_to_none=True)
        recon, lb = model.losses(model.training_batch(step, n_batch))
        (recon + lb).sum().backward()
        opt.step()
        recon_hist[step] = recon.detach()
        lb_hist[step] = lb.detach()
        if step % print_freq == 0 or step + 1 == steps:
            log_step(step, float(recon_hist[step].mean()), float(lb_hist[step].mean()) if has_lb else None,
                     step_lr, prefix)
            if callback is not None:
                r, b = (recon_hist[step].cpu(), lb_hist[step].cpu()) if shape else (float(recon_hist[step]),
                                                                                   float(lb_hist[step]))
                callback(dict(step=step, reconstruction_loss=r, load_balance_loss=b if has_lb else None,
                              lr=step_lr, model=model))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return {"reconstruction_loss": recon_hist.cpu(), "load_balance_loss": lb_hist.cpu(),
            "seconds": time.perf_counter() - start}

