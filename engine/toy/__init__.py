"""Seed 001's toy model of superposition in a Mixture of Experts (see README, "Toy model of superposition").

- :mod:`moetrace.toy.model`: ``Config``, ``MoEModel``, ``optimize`` (one model, the seed's names);
- :mod:`moetrace.toy.batched`: ``BatchedMoE`` / ``train_batched`` (many models, instance axis ``I``);
- :mod:`moetrace.toy.metrics`: dimensionality, specialization, usage, polysemanticity;
- :mod:`moetrace.toy.sweep`: grids of models -> one tidy table;
- :mod:`moetrace.toy.plots`: the per-expert figure, the sweep's phase diagrams and the papers' figures (PNG);
- :mod:`moetrace.toy.reproduce`: Chaudhari et al. 2025 and Elhage et al. 2022 rerun in their own designs.
"""

from moetrace.toy.batched import BatchedMoE, train_batched
from moetrace.toy.metrics import (expert_feat_dimensionality, feature_specialization, global_feature_dimensionality,
                                  most_monosemantic, polysemanticity, weighted_global_dim)
from moetrace.toy.model import (SCHEDULES, Config, MoEModel, constant_lr, cosine_decay_lr, default_device,
                                feature_batch, linear_lr, optimize)

__all__ = [
    "BatchedMoE", "Config", "MoEModel", "SCHEDULES", "constant_lr", "cosine_decay_lr", "default_device",
    "expert_feat_dimensionality", "feature_batch", "feature_specialization", "global_feature_dimensionality",
    "linear_lr", "most_monosemantic", "optimize", "polysemanticity", "train_batched",
    "weighted_global_dim",
]
