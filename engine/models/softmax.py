"""Softmax-scored routers: top-k of softmax(logits), optionally renormalized.

Top-k of the logits followed by a softmax over the K selected (GPT-OSS, Aria, Granite) is the
same routing as softmax over all experts then renormalization, so those families use
``renormalize=True``.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from moetrace.errors import MoetraceError
from moetrace.models.base import RouteSpec, RouterAdapter, fp32_linear
from moetrace.models.registry import register


class SoftmaxTopKAdapter(RouterAdapter):
    """softmax(logits) -> top-k -> renormalize when ``router.norm_topk_prob``; weights in logits dtype."""

    scoring = "softmax"


@register
class OlmoeAdapter(SoftmaxTopKAdapter):
    family = "olmoe"
    router_classes = ("OlmoeTopKRouter",)


@register
class Qwen2MoeAdapter(SoftmaxTopKAdapter):
    """Qwen2-MoE; the shared expert and its sigmoid gate live in the MoE block, outside routing."""

    family = "qwen2_moe"
    router_classes = ("Qwen2MoeTopKRouter",)


@register
class Qwen3MoeAdapter(SoftmaxTopKAdapter):
    family = "qwen3_moe"
    router_classes = ("Qwen3MoeTopKRouter",)


@register
class FlexOlmoAdapter(SoftmaxTopKAdapter):
    family = "flex_olmo"
    router_classes = ("FlexOlmoTopKRouter",)


@register
class MellumAdapter(SoftmaxTopKAdapter):
    family = "mellum"
    router_classes = ("MellumTopKRouter",)


@register
class Qwen3NextAdapter(SoftmaxTopKAdapter):
    family = "qwen3_next"
    router_classes = ("Qwen3NextTopKRouter",)


@register
class Qwen3_5MoeAdapter(SoftmaxTopKAdapter):
    """Qwen3.5-MoE: always renormalized."""

    family = "qwen3_5_moe"
    router_classes = ("Qwen3_5MoeTopKRouter",)
    renormalize = True


@register
class JambaAdapter(SoftmaxTopKAdapter):
    """Jamba: top-k of the softmax, never renormalized, weights in the input dtype."""

    family = "jamba"
    router_classes = ("JambaTopKRouter",)
    renormalize = False
    weights_dtype = "hidden"
    flatten_input = False


@register
class MixtralAdapter(SoftmaxTopKAdapter):
    """Mixtral: softmax in fp32, always renormalized, fp32 weights."""

    family = "mixtral"
    router_classes = ("MixtralTopKRouter",)
    renormalize = True
    weights_dtype = "float32"


@register
class MiniMaxAdapter(MixtralAdapter):
    family = "minimax"
    router_classes = ("MiniMaxTopKRouter",)


@register
class GptOssAdapter(SoftmaxTopKAdapter):
    """GPT-OSS: logits with a per-expert bias inside the linear; top-k then softmax over the K."""

    family = "gpt_oss"
    router_classes = ("GptOssTopKRouter",)
    renormalize = True
    flatten_input = False

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, router.weight, router.bias)


@register
class AriaAdapter(SoftmaxTopKAdapter):
    """Aria: top-k of the logits, softmax over the K selected."""

    family = "aria"
    router_classes = ("AriaTextTopKRouter",)
    renormalize = True
    flatten_input = False


@register
class GraniteMoeAdapter(SoftmaxTopKAdapter):
    """Granite-MoE (and its SWA / shared-expert variants): fp32 logits, softmax over the top K."""

    family = "granitemoe"
    router_classes = ("GraniteMoeTopKRouter", "GraniteMoeSWATopKRouter", "GraniteMoeSharedTopKRouter")
    renormalize = True
    weights_dtype = "hidden"
    flatten_input = False

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().logits(router, hidden_states).float()


@register
class Cohere2MoeAdapter(SoftmaxTopKAdapter):
    """Cohere2-MoE: top-k of the logits, then softmax over the K or sigmoid (renormalized when
    ``norm_topk_prob``), chosen by ``config.expert_selection_fn``; weights in the input dtype."""

    family = "cohere2_moe"
    router_classes = ("Cohere2MoeTopKRouter",)
    weights_dtype = "hidden"
    flatten_input = False

    def spec(self, router: nn.Module) -> RouteSpec:
        base = super().spec(router)
        if router.expert_selection_fn == "softmax":
            return replace(base, renormalize=True)
        return replace(base, scoring="sigmoid", renormalize=bool(router.norm_topk_prob))

    def check(self, router: nn.Module, name: str) -> None:
        if router.expert_selection_fn not in ("softmax", "sigmoid"):
            raise MoetraceError(
                f"router {name!r}: expected expert_selection_fn 'softmax' or 'sigmoid', "
                f"got {router.expert_selection_fn!r}"
            )


@register
class DeepseekV2Adapter(SoftmaxTopKAdapter):
    """DeepSeek-V2 (``topk_method="greedy"``): fp32 softmax, top-k unnormalized, times
    ``routed_scaling_factor``. Its ``group_limited_greedy`` (group score = max) is not covered."""

    family = "deepseek_v2"
    router_classes = ("DeepseekV2TopkRouter",)
    renormalize = False

    def check(self, router: nn.Module, name: str) -> None:
        if router.topk_method != "greedy":
            raise MoetraceError(
                f"router {name!r}: expected topk_method 'greedy' (the only DeepSeek-V2 selection "
                f"moetrace covers), got {router.topk_method!r}"
            )

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        return fp32_linear(router, hidden_states)

    def routed_scaling(self, router: nn.Module) -> float:
        return router.routed_scaling_factor
