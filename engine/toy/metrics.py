"""Seed 001's superposition metrics, on one model or on a stack of models.

The tensor functions take weights with any leading axes: ``W [..., E, F, H]`` (one model:
``[E, F, H]``; a sweep: ``[I, E, F, H]``) and return float tensors; the seed's named functions
(:func:`expert_feat_dimensionality`, :func:`feature_specialization`,
:func:`global_feature_dimensionality`, :func:`weighted_global_dim`) take a model and round to 3
decimals like the seed.

- dimensionality ``D_i^(e) = ||W_i^(e)||^2 / sum_j (W_hat_i^(e) . W_j^(e))^2``, ``W_hat = W / ||W||``;
- specialization ``S_i^(e) = ||W_i^(e)||^2 / sum_e' ||W_i^(e')||^2``;
- usage: the seed's top-1 share (its named functions), Chaudhari et al.'s mean routing weight
  ``p_e`` and their per-feature ``alpha_i^(e)`` (expert e active given feature i present);
- global dimensionality ``sum_e alpha_i^(e) D_i^(e)`` (sweeps), the seed's ``sum_e p_e D_i^(e)``
  with top-1 usage (its named function), or ``sum_e S_i^(e) D_i^(e)`` (weights only);
- features per dimension ``sum_e p_e ||W^(e)||_F^2 / m / k`` (Chaudhari et al.);
- polysemanticity of ``(e, i)``: ``|| (W_hat'_i . W_j)_{j != i} ||`` with ``W_hat' = W / (1e-5 + ||W||)``;
- features represented: global dimensionality above 0.05.

Sweep metrics never count all-zero inputs: such an input is an exact router tie that goes to
expert 0, and at sparse settings it is most inputs (82% at F = 20, p = 0.01), so a usage over all
inputs describes the tie-break instead of the weights.

One deliberate difference: a weight row that is exactly zero (only padded experts of a sweep, in
practice) gives the seed ``0/0 = NaN``; here its dimensionality is 0 (it occupies no dimension)
and its specialization 0 (when the feature has no weight in any expert).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REPRESENTED_THRESHOLD = 0.05  # seed: global dimensionality > 0.05 counts a feature as represented
PRESENT_NORM2 = 0.25          # (e, i) counted as "in expert e" when ||W_i^(e)||^2 > 0.25 (norm > 0.5)
MONOSEMANTIC_DIM = 0.9        # an (e, i) in expert e with D > 0.9 has a dimension (almost) to itself


def feature_dimensionality(W: torch.Tensor) -> torch.Tensor:
    """``W [..., E, F, H]`` -> ``D [..., E, F]`` (0 where ``W_i^(e) = 0``)."""
    norm2 = (W * W).sum(-1)
    w_hat = W / norm2.sqrt()[..., None]
    interference = (torch.einsum("...ih,...jh->...ij", w_hat, W) ** 2).sum(-1)
    return torch.nan_to_num(norm2 / interference, nan=0.0)


def specialization(W: torch.Tensor) -> torch.Tensor:
    """``W [..., E, F, H]`` -> ``S [..., E, F]``, summing to 1 over experts for every feature."""
    norm2 = (W * W).sum(-1)
    return torch.nan_to_num(norm2 / norm2.sum(-2, keepdim=True), nan=0.0)


def polysemanticity(W: torch.Tensor) -> torch.Tensor:
    """``W [..., E, F, H]`` -> ``[..., E, F]``: norm of feature i's interference with the others."""
    w_hat = W / (1e-5 + torch.linalg.vector_norm(W, dim=-1, keepdim=True))
    inter = torch.einsum("...ih,...jh->...ij", w_hat, W)
    inter = inter * (1 - torch.eye(W.shape[-2], dtype=W.dtype, device=W.device))
    return torch.linalg.vector_norm(inter, dim=-1)


def most_monosemantic(W: torch.Tensor, n: int = 10) -> torch.Tensor:
    """``[..., E, n]`` feature indices with the lowest polysemanticity per expert (seed: ``topk(largest=False)``).

    As in the seed, a feature an expert does not represent (norm ~ 0) has ~0 interference and ranks
    as monosemantic.
    """
    poly = polysemanticity(W)
    return torch.topk(poly, k=min(n, poly.shape[-1]), dim=-1, largest=False).indices


def expert_usage(gate: torch.Tensor, x: torch.Tensor, expert_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Top-1 usage ``[..., E]`` on inputs ``x [..., B, F]`` for ``gate [..., E, F]`` (sums to 1)."""
    logits = torch.einsum("...bf,...ef->...be", x, gate)
    if expert_mask is not None:
        logits = logits.masked_fill(~expert_mask[..., None, :], float("-inf"))
    top1 = F.softmax(logits, dim=-1).argmax(-1)
    counts = F.one_hot(top1, gate.shape[-2]).to(gate.dtype).sum(-2)
    return counts / counts.sum(-1, keepdim=True)


def nonzero_inputs(x: torch.Tensor) -> torch.Tensor:
    """``[..., B]`` 1.0 where input ``x [..., B, F]`` has at least one feature present, else 0.0.

    An all-zero input gives every expert the same router score, an exact tie that top-k breaks
    towards expert 0; usage measured over such inputs describes the tie-break, not the model.
    """
    return (x != 0).any(-1).to(x.dtype)


def routing_usage(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``p_e [..., E]``: mean routing weight of expert ``e`` over the inputs of ``x`` that are not all zero.

    weights ``[..., B, E]`` (the router's output for ``x [..., B, F]``). Chaudhari et al.'s
    ``p_e`` (``expert_weights.sum(0) / n_samples``) over their inputs, of which at most 3e-5 are
    all zero in their design (n = 100, p >= 0.1); here those inputs are left out explicitly.
    """
    keep = nonzero_inputs(x)
    return torch.einsum("...b,...be->...e", keep, weights) / keep.sum(-1, keepdim=True).clamp_min(1)


def presence_usage(active: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``alpha [..., F, E]``: share of the inputs where feature ``i`` is present that expert ``e`` is active on.

    active ``[..., B, E]`` (1 for the top-k experts). Chaudhari et al.'s ``alpha_i^(e)`` (their
    ``global_feat_dim``); every counted input has feature ``i`` present, so all-zero inputs never
    count. A feature never present in ``x`` gets 0.
    """
    present = (x > 0).to(active.dtype)
    counts = present.sum(-2)
    both = torch.einsum("...bf,...be->...fe", present, active)
    return both / counts.clamp_min(1)[..., None]


def global_dimensionality(W: torch.Tensor, x: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``[..., F]``: ``sum_e alpha_i^(e) D_i^(e)`` (Chaudhari et al.'s global dimensionality, with
    :func:`presence_usage`'s alpha on inputs ``x`` and the router's ``active`` for them)."""
    return torch.einsum("...fe,...ef->...f", presence_usage(active, x), feature_dimensionality(W))


def features_per_dimension(W: torch.Tensor, usage: torch.Tensor, n_active: torch.Tensor | int) -> torch.Tensor:
    """Chaudhari et al.'s features per dimension ``sum_e p_e ||W^(e)||_F^2 / m / k``: ``[...]``.

    W ``[..., E, F, m]``, usage ``p_e [..., E]`` (:func:`routing_usage`), ``k`` per model. For
    one expert (dense) this is ``||W||_F^2 / m``, the inverse of Elhage et al.'s dimensions per
    feature.
    """
    frob = (W * W).sum((-1, -2))
    return (usage * frob).sum(-1) / W.shape[-1] / torch.as_tensor(n_active, dtype=W.dtype, device=W.device)


def summary(W: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, active: torch.Tensor,
            expert_mask: torch.Tensor, n_active: torch.Tensor | int) -> dict[str, torch.Tensor]:
    """Scalar metrics per model: every value ``[...]`` (one per leading index).

    W ``[..., E, F, H]``; inputs ``x [..., B, F]`` and the router's output for them, ``weights``
    and ``active`` ``[..., B, E]`` (``BatchedMoE.route``); expert_mask ``[..., E]`` (False for
    padded experts); ``k`` per model. Nothing here counts an all-zero input: usage is over inputs
    that are not all zero, or over inputs where the feature in question is present.

    - ``features_per_dim``: Chaudhari et al.'s features per dimension (:func:`features_per_dimension`);
    - ``n_represented``: features whose :func:`global_dimensionality` exceeds 0.05;
    - ``mean_global_dim`` / ``mean_weighted_global_dim``: mean over features of that global
      dimensionality / of the specialization-weighted ``sum_e S_i^(e) D_i^(e)`` (weights only);
    - ``dims_per_feature``: mean over real experts of ``H / ||W^(e)||_F^2`` (Elhage et al.);
    - ``mean_expert_dim``: mean ``D_i^(e)`` over pairs (e, i) with ``||W_i^(e)||^2 > 0.25``;
    - ``monosemantic_fraction``: share of those pairs with ``D_i^(e) > 0.9`` (no signal when
      features far outnumber hidden dimensions: then almost no feature has a dimension to itself);
    - ``features_per_expert``: mean over real experts of the number of such pairs;
    - ``mean_polysemanticity``: mean polysemanticity over those pairs;
    - ``mean_max_specialization``: mean over represented features of ``max_e S_i^(e)``;
    - ``usage_entropy``: entropy (nats) of ``p_e`` normalized to sum to 1.
    """
    mask = expert_mask.to(W.dtype)
    n_exp = mask.sum(-1)
    D = feature_dimensionality(W)
    norm2 = (W * W).sum(-1)
    usage = routing_usage(weights, x)
    glob = global_dimensionality(W, x, active)
    S = specialization(W)
    present = (norm2 > PRESENT_NORM2).to(W.dtype) * mask[..., None]
    n_present = present.sum((-1, -2))
    represented = (glob > REPRESENTED_THRESHOLD).to(W.dtype)
    frob = norm2.sum(-1)
    share = usage / usage.sum(-1, keepdim=True).clamp_min(1e-30)
    return {
        "features_per_dim": features_per_dimension(W, usage, n_active),
        "n_represented": represented.sum(-1),
        "mean_global_dim": glob.mean(-1),
        "mean_weighted_global_dim": (S * D).sum(-2).mean(-1),
        "dims_per_feature": (torch.nan_to_num(W.shape[-1] / frob, posinf=0.0) * mask).sum(-1) / n_exp,
        "mean_expert_dim": (D * present).sum((-1, -2)) / n_present,
        "monosemantic_fraction": ((D > MONOSEMANTIC_DIM).to(W.dtype) * present).sum((-1, -2)) / n_present,
        "features_per_expert": n_present / n_exp,
        "mean_polysemanticity": (polysemanticity(W) * present).sum((-1, -2)) / n_present,
        "mean_max_specialization": (S.amax(-2) * represented).sum(-1) / represented.sum(-1),
        "usage_entropy": -(share * torch.log(share.clamp_min(1e-30))).sum(-1),
    }


# ------------------------------------------------------------- the seed's named functions
def expert_feat_dimensionality(model, decimals: int | None = 3) -> torch.Tensor:
    """Seed: ``[E, F]`` fraction of a dimension of expert e that feature i occupies."""
    return _round(feature_dimensionality(model.W_experts.detach()), decimals)


def feature_specialization(model, decimals: int | None = 3) -> torch.Tensor:
    """Seed: ``[E, F]`` fraction of feature i's squared norm held by expert e."""
    return _round(specialization(model.W_experts.detach()), decimals)


def global_feature_dimensionality(model, input_features: torch.Tensor | None = None, n_batch: int = 4096,
                                  decimals: int | None = 3):
    """Seed: ``(usage [E], D_global [F])`` with top-1 usage on ``input_features`` (default: a fresh
    ``model.generate_batch(n_batch)``) and ``D_global = sum_e usage_e * round(D^(e))``."""
    if input_features is None:
        input_features = model.generate_batch(n_batch)
    with torch.no_grad():
        usage = expert_usage(model.gate.detach(), input_features)
        dims = torch.einsum("e,ef->f", usage, expert_feat_dimensionality(model, decimals))
    return usage, _round(dims, decimals)


def weighted_global_dim(model, decimals: int | None = 3) -> torch.Tensor:
    """Seed: ``[F]``, ``sum_e S_i^(e) D_i^(e)`` of the (rounded) S and D, itself not rounded."""
    return (feature_specialization(model, decimals) * expert_feat_dimensionality(model, decimals)).sum(0)


def _round(t: torch.Tensor, decimals: int | None) -> torch.Tensor:
    return t if decimals is None else torch.round(t, decimals=decimals)
