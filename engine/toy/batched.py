"""Many toy MoEs in one tensor program: an explicit instance axis ``I`` on every parameter.

``W_experts [I, E, F, H]``, ``b_final [I, E, F]``, ``gate [I, E, F]``; instance ``i`` has its own
``n_experts``, ``n_active_experts``, renormalization, load-balancing flag, feature probability
``[F]``, importance ``[F]`` and seed. All instances share ``F`` and ``H``.

Different numbers of experts: parameters are padded to ``E = max_i E_i`` with zeros and the
padded experts are masked (router logit ``-inf``, so probability 0, never in the top-k, weight 0,
no gradient; AdamW leaves their zeros at zero). ``k`` varies per instance by taking the top
``max_i k_i`` and dropping ranks ``>= k_i``. Padding costs compute (every instance runs ``E``
experts); :func:`moetrace.toy.sweep.run_sweep` therefore trains one group per distinct ``E`` by
default (``group_by_experts=True``) and pads only on request.

Loss: per instance, exactly the single model's loss (importance-weighted squared error, mean over
the batch, summed over features, plus that instance's own load-balancing loss with its own
``E_i``); the training objective is the SUM over instances, so each instance's gradient is its own
and AdamW, being elementwise, updates each instance as if it were trained alone. Instance ``i``
initialized from ``seeds[i]`` and fed :func:`moetrace.toy.model.feature_batch` equals
``optimize(MoEModel(configs[i], ..., seed=seeds[i]))`` up to floating-point summation order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moetrace.errors import MoetraceError
from moetrace.toy.model import (Config, MoEModel, constant_lr, default_device, feature_batch, init_parameters,
                                per_feature, top_k_indices, train_loop)


class BatchedMoE(nn.Module):
    """``I`` toy MoEs trained together (see the module docstring).

    configs: one :class:`Config` per instance (same ``n_features``, ``n_hidden``).
    feature_probability, importance: per instance a scalar or ``[F]`` (a sequence of length ``I``).
    seeds: ``I`` ints. device None: a GPU when there is one. feature_reduction: ``"sum"`` (the
    seed's ``optimize``: the squared error summed over features) or ``"mean"`` (Chaudhari et al.'s
    ``optimize_vectorized`` and Elhage et al.'s notebook: averaged over features, i.e. divided by F).
    """

    def __init__(self, configs: Sequence[Config], feature_probability: Sequence, importance: Sequence | None = None,
                 seeds: Sequence[int] | None = None, device=None, dtype: torch.dtype = torch.float32,
                 feature_reduction: str = "sum"):
        super().__init__()
        if feature_reduction not in ("sum", "mean"):
            raise MoetraceError(f"toy BatchedMoE: feature_reduction must be 'sum' or 'mean', got {feature_reduction!r}")
        self.feature_reduction = feature_reduction
        configs = list(configs)
        n_inst = len(configs)
        if n_inst == 0:
            raise MoetraceError("toy BatchedMoE: configs is empty, expected at least one instance")
        n_feat, n_hid = configs[0].n_features, configs[0].n_hidden
        for i, c in enumerate(configs):
            if (c.n_features, c.n_hidden) != (n_feat, n_hid):
                raise MoetraceError(f"toy BatchedMoE: configs[{i}] has n_features, n_hidden = {c.n_features}, "
                                    f"{c.n_hidden}; expected {n_feat}, {n_hid} like configs[0]")
        importance = [None] * n_inst if importance is None else list(importance)
        seeds = list(range(n_inst)) if seeds is None else [int(s) for s in seeds]
        feature_probability = list(feature_probability)
        for name, seq in (("feature_probability", feature_probability), ("importance", importance), ("seeds", seeds)):
            if len(seq) != n_inst:
                raise MoetraceError(f"toy BatchedMoE: {name} has {len(seq)} entries, expected one per config ({n_inst})")
        device = torch.device(device) if device is not None else default_device()
        self.configs, self.seeds = configs, seeds
        n_exp = max(c.n_experts for c in configs)
        W = torch.zeros(n_inst, n_exp, n_feat, n_hid, dtype=dtype)
        b = torch.zeros(n_inst, n_exp, n_feat, dtype=dtype)
        gate = torch.zeros(n_inst, n_exp, n_feat, dtype=dtype)
        for i, (c, s) in enumerate(zip(configs, seeds)):  # once, at construction
            Wi, bi, gi = init_parameters(c, s, dtype)
            W[i, : c.n_experts], b[i, : c.n_experts], gate[i, : c.n_experts] = Wi, bi, gi
        self.W_experts = nn.Parameter(W.to(device))
        self.b_final = nn.Parameter(b.to(device))
        self.gate = nn.Parameter(gate.to(device))

        def buf(values, dt=None):
            return torch.tensor(values, dtype=dt).to(device)

        self.register_buffer("expert_mask", torch.arange(n_exp)[None, :].to(device) < buf([c.n_experts for c in configs])[:, None])
        self.register_buffer("n_experts", buf([c.n_experts for c in configs]))
        self.register_buffer("n_active", buf([c.n_active_experts for c in configs]))
        self.register_buffer("renormalize", buf([c.renormalize for c in configs]))
        self.register_buffer("lb_coef", buf([c.load_balancing_coef * c.load_balancing_loss for c in configs], torch.float64).to(dtype))
        self.register_buffer("seed_tensor", torch.tensor(seeds, dtype=torch.int64).to(device))
        self.register_buffer("feature_probability", torch.stack(
            [per_feature(p, n_feat, f"feature_probability[{i}]") for i, p in enumerate(feature_probability)]).to(device, dtype))
        self.register_buffer("importance", torch.stack(
            [per_feature(w, n_feat, f"importance[{i}]") for i, w in enumerate(importance)]).to(device, dtype))

    @property
    def n_instances(self) -> int:
        return self.W_experts.shape[0]

    def route(self, x: torch.Tensor):
        """``x [I, B, F]`` -> ``(weights [I, B, E], active [I, B, E] 0/1, load_balance_loss [I])``."""
        logits = torch.einsum("ibf,ief->ibe", x, self.gate).masked_fill(~self.expert_mask[:, None, :], float("-inf"))
        probs = F.softmax(logits, dim=-1)
        k_max = int(self.n_active.max())
        top_idx = top_k_indices(probs, k_max)  # [I, B, k_max]
        keep = (torch.arange(k_max, device=x.device)[None, :] < self.n_active[:, None]).to(probs.dtype)
        active = torch.zeros_like(probs).scatter(-1, top_idx, keep[:, None, :].expand(top_idx.shape))
        lb = self.lb_coef * self.n_experts.to(probs.dtype) * (active.mean(1) * probs.mean(1)).sum(-1)
        picked = probs * active
        renorm = picked / picked.sum(-1, keepdim=True)
        weights = torch.where(self.renormalize[:, None, None], renorm, picked)
        return weights, active, lb

    def forward(self, x: torch.Tensor):
        """``x [I, B, F]`` -> ``(reconstruction [I, B, F], load_balance_loss [I])``."""
        weights, _, lb = self.route(x)
        hidden = torch.einsum("ibf,iefh->ibeh", x, self.W_experts)
        expert_out = F.relu(torch.einsum("ibeh,iefh->ibef", hidden, self.W_experts) + self.b_final[:, None])
        return torch.einsum("ibe,ibef->ibf", weights, expert_out), lb

    def training_batch(self, step: int, n_batch: int) -> torch.Tensor:
        """``[I, n_batch, F]``: instance ``i`` gets ``MoEModel(..., seed=seeds[i]).training_batch(step, n_batch)``."""
        return feature_batch(self.seed_tensor, step, n_batch, self.feature_probability, self.W_experts.dtype)

    def reconstruction_loss(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``[I]``: ``sum_f importance_if * mean_b (x - out)^2`` per instance (``mean_f`` with ``feature_reduction="mean"``)."""
        per_feature_error = (self.importance[:, None, :] * (x - out) ** 2).mean(1)
        return per_feature_error.mean(-1) if self.feature_reduction == "mean" else per_feature_error.sum(-1)

    def losses(self, x: torch.Tensor):
        """``(reconstruction loss [I], load-balancing loss [I])`` (0 where an instance has none)."""
        out, lb = self(x)
        return self.reconstruction_loss(x, out), lb

    def instance(self, i: int) -> MoEModel:
        """Instance ``i`` as a standalone :class:`MoEModel` (a copy, on the same device)."""
        c = self.configs[i]
        m = MoEModel(c, self.feature_probability[i].cpu(), self.importance[i].cpu(), device=self.W_experts.device,
                     seed=self.seeds[i], dtype=self.W_experts.dtype)
        with torch.no_grad():
            m.W_experts.copy_(self.W_experts[i, : c.n_experts])
            m.b_final.copy_(self.b_final[i, : c.n_experts])
            m.gate.copy_(self.gate[i, : c.n_experts])
        return m


def train_batched(model: BatchedMoE, n_batch: int = 1024, steps: int = 10_000, print_freq: int = 100,
                  lr: float = 1e-3, lr_scale: Callable[[int, int], float] = constant_lr, weight_decay: float = 0.01,
                  callback: Callable[[dict], None] | None = None) -> dict:
    """Train all instances at once; the objective is the sum over instances of each one's loss.

    Logs ``Step N: Reconstruction loss=<mean over instances>, lr=...`` every ``print_freq`` steps and
    calls ``callback`` like :func:`moetrace.toy.model.optimize` (with per-instance float64 tensors).
    Returns ``{"reconstruction_loss": [steps, I], "load_balance_loss": [steps, I], "seconds": float}``.
    """
    return train_loop(model, (model.n_instances,), n_batch, steps, print_freq, lr, lr_scale, weight_decay, callback,
                      bool((model.lb_coef > 0).any()), f"[{model.n_instances} models, mean] ")
