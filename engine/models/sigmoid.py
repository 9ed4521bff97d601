"""Sigmoid-scored routers (DeepSeek-V3 family and its descendants).

s = sigmoid(logits); experts are selected by s + e_score_correction_bias (the bias only
affects selection), optionally within the ``topk_group`` best of ``n_group`` expert groups
(group score = sum of the group's two best biased scores); the weights are the unbiased s of
the selected experts, renormalized when the router says so, times a routed scaling factor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moetrace.errors import MoetraceError
from moetrace.models.base import RouterAdapter, fp32_linear
from moetrace.models.registry import register


class GroupedSigmoidAdapter(RouterAdapter):
    """DeepSeek-V3 router: fp32 logits, sigmoid, correction bias, group-limited top-k,
    ``norm_topk_prob``, ``routed_scaling_factor``; all read off the router module."""

    scoring = "sigmoid"
    grouped = True
    weights_dtype = "float32"

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return fp32_linear(router, hidden_states)

    def selection_bias(self, router: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        return router.e_score_correction_bias

    def routed_scaling(self, router: nn.Module) -> float:
        return router.routed_scaling_factor


@register
class DeepseekV3Adapter(GroupedSigmoidAdapter):
    family = "deepseek_v3"
    router_classes = ("DeepseekV3TopkRouter",)


@register
class DeepseekV32Adapter(GroupedSigmoidAdapter):
    family = "deepseek_v32"
    router_classes = ("DeepseekV32TopkRouter",)


@register
class Dots1Adapter(GroupedSigmoidAdapter):
    family = "dots1"
    router_classes = ("Dots1TopkRouter",)


@register
class Glm4MoeAdapter(GroupedSigmoidAdapter):
    family = "glm4_moe"
    router_classes = ("Glm4MoeTopkRouter",)


@register
class Glm4MoeLiteAdapter(GroupedSigmoidAdapter):
    family = "glm4_moe_lite"
    router_classes = ("Glm4MoeLiteTopkRouter",)


@register
class GlmMoeDsaAdapter(GroupedSigmoidAdapter):
    family = "glm_moe_dsa"
    router_classes = ("GlmMoeDsaTopkRouter",)


@register
class HYV4Adapter(GroupedSigmoidAdapter):
    family = "hy_v4"
    router_classes = ("HYV4TopkRouter",)


@register
class SolarOpenAdapter(GroupedSigmoidAdapter):
    family = "solar_open"
    router_classes = ("SolarOpenTopkRouter",)


@register
class ExaoneMoeAdapter(GroupedSigmoidAdapter):
    family = "exaone_moe"
    router_classes = ("ExaoneMoeTopkRouter",)


@register
class AXK1Adapter(GroupedSigmoidAdapter):
    family = "axk1"
    router_classes = ("AXK1TopkRouter",)


@register
class Dots3NoteAdapter(GroupedSigmoidAdapter):
    family = "dots3_note"
    router_classes = ("Dots3NoteTextTopkRouter",)


@register
class NemotronHAdapter(GroupedSigmoidAdapter):
    family = "nemotron_h"
    router_classes = ("NemotronHTopkRouter",)


@register
class BailingHybridAdapter(GroupedSigmoidAdapter):
    family = "bailing_hybrid"
    router_classes = ("BailingHybridTopkRouter",)


@register
class KimiLinearAdapter(GroupedSigmoidAdapter):
    family = "kimi_linear"
    router_classes = ("KimiLinearTopkRouter",)


@register
class MiniMaxM2Adapter(RouterAdapter):
    """MiniMax-M2: sigmoid of logits computed in the weight dtype, selection bias passed in by the
    MoE block as the router's second argument, always renormalized, fp32 weights."""

    family = "minimax_m2"
    router_classes = ("MiniMaxM2TopKRouter",)
    scoring = "sigmoid"
    renormalize = True
    weights_dtype = "float32"

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, router.weight.shape[1])
        return F.linear(flat.to(router.weight.dtype), router.weight)

    def selection_bias(self, router: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        return args[1] if len(args) > 1 else kwargs["e_score_correction_bias"]


@register
class MiniMaxM3VLAdapter(MiniMaxM2Adapter):
    """MiniMax-M3-VL text decoder: the bias is a router buffer."""

    family = "minimax_m3_vl"
    router_classes = ("MiniMaxM3VLTopKRouter",)

    def selection_bias(self, router: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        return router.e_score_correction_bias


@register
class HYV3Adapter(MiniMaxM2Adapter):
    """Hunyuan-V3: fp32 logits, bias passed by the block, renormalized, times router_scaling_factor."""

    family = "hy_v3"
    router_classes = ("HYV3TopKRouter",)

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return fp32_linear(router, hidden_states)

    def routed_scaling(self, router: nn.Module) -> float:
        return router.router_scaling_factor


@register
class LagunaAdapter(RouterAdapter):
    """Laguna: fp32 logits with optional tanh soft-capping, sigmoid + bias selection,
    always renormalized, weights in the input dtype."""

    family = "laguna"
    router_classes = ("LagunaTopKRouter",)
    scoring = "sigmoid"
    renormalize = True
    weights_dtype = "hidden"

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = super().logits(router, hidden_states).float()
        cap = router.router_logit_softcapping
        if cap > 0.0:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def selection_bias(self, router: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        return router.e_score_correction_bias


@register
class FlintAdapter(RouterAdapter):
    """Flint: fp32 logits, sigmoid without bias, renormalized when ``norm_topk_prob``."""

    family = "flint"
    router_classes = ("FlintTopKRouter",)
    scoring = "sigmoid"
    weights_dtype = "float32"

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return fp32_linear(router, hidden_states)


@register
class Inkling2Adapter(RouterAdapter):
    """Inkling-2: fp32 logits, ``scoring_func`` must be sigmoid, bias selection, renormalized,
    times routed_scaling_factor."""

    family = "inkling2"
    router_classes = ("Inkling2TopKRouter",)
    scoring = "sigmoid"
    renormalize = True
    weights_dtype = "float32"

    def check(self, router: nn.Module, name: str) -> None:
        probe = torch.linspace(-3.0, 3.0, 7)
        if not torch.allclose(router.score_fn(probe), torch.sigmoid(probe)):
            raise MoetraceError(
                f"router {name!r}: expected scoring_func 'sigmoid', got {type(router.score_fn).__name__}"
            )

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.float().reshape(-1, router.weight.shape[1])
        return F.linear(flat, router.weight)

    def selection_bias(self, router: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        return router.e_score_correction_bias

    def routed_scaling(self, router: nn.Module) -> float:
        return router.routed_scaling_factor


@register
class Lfm2MoeAdapter(RouterAdapter):
    """LFM2-MoE: sigmoid of logits in the input dtype, selection bias ``expert_bias`` passed by
    the block when ``use_expert_bias``, ``norm_topk_prob``, ``routed_scaling_factor``.

    The original renormalizes with ``sum + 1e-6``, the kernel with ``sum + 1e-20``: the weights
    agree to about 1e-6 relative, the selection exactly.
    """

    family = "lfm2_moe"
    router_classes = ("Lfm2MoeTopKRouter",)
    scoring = "sigmoid"
    flatten_input = False

    def selection_bias(self, router: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        if not router.use_expert_bias:
            return None
        return args[1] if len(args) > 1 else kwargs["expert_bias"]

    def routed_scaling(self, router: nn.Module) -> float:
        return router.routed_scaling_factor
