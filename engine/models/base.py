"""The router adapter base class: the fixed steps every transformers MoE family shares.

A transformers 5.x MoE layer owns one router module (``*TopKRouter`` / ``*TopkRouter``)
whose ``forward(hidden_states, ...)`` returns ``(router_logits, weights, indices)``:

1. ``router_logits``: a linear map of the token states, ``[..., E]`` (what ``logits`` rebuilds);
2. ``weights``: ``[..., K]`` routing weights in rank order (scoring, top-k, renormalization,
   scaling: what ``moetrace.kernels.routing.fused_route`` computes from the logits and ``RouteSpec``);
3. ``indices``: ``[..., K]`` int64 chosen experts.

``RouterAdapter`` finds those modules, maps each one to its decoder layer (``layers.<i>.``),
reads E, K, scoring, renormalization, scaling and groups off the router module, and rebuilds
the logits exactly as the original forward does. A family subclass overrides only the steps
that differ (see ``engine/models/__init__.py`` for the table of families).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from moetrace.errors import MoetraceError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class RouteSpec:
    """How one router turns its logits into ``(weights, experts)``.

    Fields are the keyword arguments of ``moetrace.kernels.routing.fused_route`` that describe the
    model (not the interventions): ``n_experts`` E, ``top_k`` K, ``scoring`` ("softmax" or
    "sigmoid"), ``renormalize`` (divide the K selected scores by their sum),
    ``routed_scaling`` (multiply the final weights), ``n_group`` / ``topk_group``
    (DeepSeek-V3 group-limited selection; None when the router has no groups).
    """

    n_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    routed_scaling: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None


@dataclass(frozen=True)
class RouterSite:
    """One router module found in a model.

    ``name`` is its dotted module path, ``layer_id`` the decoder layer index parsed from
    ``layers.<i>.``, ``position`` its rank among the model's MoE layers (0 = first MoE layer;
    path rules match the top-1 of the router at ``position - 1``).
    """

    name: str
    module: nn.Module
    layer_id: int
    position: int
    spec: RouteSpec


class RouterAdapter:
    """Base adapter: the fixed steps; family subclasses override only what differs.

    Class attributes a subclass sets:
      ``family``: short family name ("olmoe", "deepseek_v3", ...);
      ``router_classes``: names of the transformers router classes it handles;
      ``scoring``: "softmax" or "sigmoid";
      ``renormalize``: True/False, or None to read ``router.norm_topk_prob``;
      ``weights_dtype``: dtype of the weights the original returns: "logits" (dtype of
        ``router_logits``), "hidden" (dtype of the input states) or "float32";
      ``grouped``: read ``num_group`` / ``topk_group`` off the router (DeepSeek-V3 style);
      ``flatten_input``: the router reshapes its input to ``[T, H]`` before the linear (False:
        it keeps the leading dims, and so do its outputs).
    """

    family: ClassVar[str] = ""
    router_classes: ClassVar[tuple[str, ...]] = ()
    scoring: ClassVar[str] = "softmax"
    renormalize: ClassVar[bool | None] = None
    weights_dtype: ClassVar[str] = "logits"
    grouped: ClassVar[bool] = False
    flatten_input: ClassVar[bool] = True

    # ---- fixed steps -------------------------------------------------------------------

    def find_routers(self, model: nn.Module) -> list[RouterSite]:
        """Every router module of this family in ``model``, in layer order.

        Raises MoetraceError when a router is not under ``layers.<i>.``, when two routers
        share a layer index (e.g. a vision tower and a text decoder both with MoE layers),
        or when the router's configuration is one this adapter does not cover.
        """
        found = []
        for name, module in model.named_modules():
            if type(module).__name__ not in self.router_classes:
                continue
            match = _LAYER_RE.search(name + ".")
            if match is None:
                raise MoetraceError(
                    f"router module {name!r} ({type(module).__name__}): expected a path containing "
                    f"'layers.<i>.' to find its decoder layer, got none"
                )
            self.check(module, name)
            found.append((int(match.group(1)), name, module))
        found.sort(key=lambda item: item[0])
        layer_ids = [layer for layer, _, _ in found]
        if len(set(layer_ids)) != len(layer_ids):
            names = [name for _, name, _ in found]
            raise MoetraceError(
                f"model {type(model).__name__}: expected one {self.family} router per decoder layer, "
                f"got several sharing a layer index: {names}"
            )
        return [
            RouterSite(name=name, module=module, layer_id=layer, position=i, spec=self.spec(module))
            for i, (layer, name, module) in enumerate(found)
        ]

    def spec(self, router: nn.Module) -> RouteSpec:
        """The router's ``RouteSpec``, read off the module (what its forward uses)."""
        renormalize = self.renormalize
        if renormalize is None:
            renormalize = bool(router.norm_topk_prob)
        n_group = topk_group = None
        if self.grouped:
            n_group, topk_group = int(router.num_group), int(router.topk_group)
        return RouteSpec(
            n_experts=int(router.num_experts),
            top_k=int(router.top_k),
            scoring=self.scoring,
            renormalize=renormalize,
            routed_scaling=float(self.routed_scaling(router)),
            n_group=n_group,
            topk_group=topk_group,
        )

    def hidden_states(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """The token states the router was called with (first positional argument)."""
        return args[0] if args else kwargs["hidden_states"]

    def output_dtype(self, router_logits: torch.Tensor, hidden_states: torch.Tensor) -> torch.dtype:
        """dtype of the weights the original forward returns (see ``weights_dtype``)."""
        if self.weights_dtype == "hidden":
            return hidden_states.dtype
        if self.weights_dtype == "float32":
            return torch.float32
        return router_logits.dtype

    # ---- steps a family may override ---------------------------------------------------

    def check(self, router: nn.Module, name: str) -> None:
        """Raise MoetraceError when this router's configuration is not covered."""

    def logits(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, E]`` (``[..., E]`` without ``flatten_input``) exactly as the original
        forward computes them.

        Default: ``F.linear(hidden_states.reshape(-1, H), router.weight)`` in the input dtype.
        """
        return F.linear(self.flat(router, hidden_states), router.weight)

    def flat(self, router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` reshaped to ``[T, H]`` when the router does so (``flatten_input``)."""
        if self.flatten_input:
            return hidden_states.reshape(-1, router.weight.shape[1])
        return hidden_states

    def selection_bias(self, router: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor | None:
        """Per-expert bias ``[E]`` added to the scores for selection only (None: no bias)."""
        return None

    def routed_scaling(self, router: nn.Module) -> float:
        """Factor the router multiplies its final weights by."""
        return 1.0


def fp32_linear(router: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``F.linear(h.float(), w.float())`` over ``h.reshape(-1, H)``: fp32 logits ``[T, E]``."""
    flat = hidden_states.reshape(-1, router.weight.shape[1])
    return F.linear(flat.float(), router.weight.float())
