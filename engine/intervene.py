"""Interventions inside transformers MoE routers, and the observer hook capture builds on.

``patch_routers(model, targets, observer=...)`` replaces the ``forward`` of every router
module (instance attribute, so only this model is touched) with one that:

1. rebuilds the router logits exactly as the original forward does (the family adapter,
   ``moetrace.models``);
2. routes them with ``moetrace.kernels.routing.fused_route``, passing this layer's expert mask, path
   table, pair table and boosts from ``Targets``, and the top-1 experts the previous MoE layer
   actually routed the same tokens to (``prev_top1``; the first MoE layer has none);
3. calls every registered observer with a ``RouteEvent`` (the routing actually used);
4. returns ``(router_logits, weights, indices)`` with the shapes and dtypes the original
   returns (indices int64, weights in the family's dtype).

Targets are checked once, when a context is entered (layers and experts exist; in reroute mode
every layer keeps K selectable experts, K + 1 with pair rules, whatever rules fire together), so
the patched forward calls ``fused_route(..., validate=False)``: no host sync and no data-dependent
Python per forward, and ``torch.compile`` captures the model under any intervention without a
graph break (the Triton kernel is the custom op ``moetrace::route``).

Layers run in order within one forward, so the per-forward state is the list of top-1
tensors per MoE layer position, reset when the first MoE layer runs. Path rules whose prefix is
longer than one layer are matched in torch against that history and passed to the kernel as a
per-token ``[T, E]`` mask (they then follow ``mask_mode`` like expert masks do).

Patches nest: ``with intervene(model, t): with observe_routing(model, fn): ...`` records the
routing used under ``t``. The innermost context that gives targets decides the interventions
(and the backend); every observer of every open context is called. Leaving a context removes
exactly that context (the next enclosing targets apply again); leaving the outermost one (normally
or by an exception) restores the original forwards. There is one patch per router module, so
contexts opened on different roots that reach the same routers (``capture(model)`` and
``intervene(model.model, ...)``) share it and compose the same way.

Route overrides. A context may also give ``override(site, logits, weights, experts) -> (weights,
experts)``: called after the live routing of every MoE layer with its router logits ``[T, E]`` (the
router's dtype) and the live ``weights`` [T, K] / ``experts`` int32 [T, K], it returns the
routing the layer actually uses (same shapes; experts int32 in [0, E)). The innermost override
applies; observers, the path-rule history and the router's outputs all see what it returns.
``moetrace.replay`` forces recorded routes this way.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moetrace.errors import MoetraceError
from moetrace.models import RouterAdapter, RouterSite, adapter_for
from moetrace.targets import Targets
from moetrace.kernels.routing import fused_route

__all__ = [
    "RouteEvent",
    "RoutingPatch",
    "ablate",
    "intervene",
    "observe_routing",
    "patch_routers",
    "router_sites",
    "steer",
]


@dataclass(frozen=True)
class RouteEvent:
    """What one MoE layer routed in one forward pass (tensors detached, on the model's device).

    layer_id: decoder layer index; position: rank among the MoE layers (0 = first).
    experts: int32 [T, K] in rank order; weights: fp32 [T, K] (what the experts were weighted
    with, after interventions); logits: [T, E] router logits as the router computed them
    (before boosts), in the router's dtype; scoring: "softmax" or "sigmoid".
    T = batch x sequence tokens of this forward, row-major (row = b * S + s), padding included.
    """

    layer_id: int
    position: int
    experts: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor
    scoring: str

    def probs(self) -> torch.Tensor:
        """fp32 [T, E] router distribution of the logits: softmax, or sigmoid scores."""
        logits = self.logits.float()
        return torch.sigmoid(logits) if self.scoring == "sigmoid" else torch.softmax(logits, dim=-1)


Observer = Callable[[RouteEvent], None]
# (site, logits [T, E], live weights [T, K], live experts int32 [T, K]) -> (weights, experts) used
Override = Callable[["RouterSite", torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def router_sites(model: nn.Module) -> list[RouterSite]:
    """Every router of ``model`` in layer order (raises MoetraceError for unsupported models)."""
    return adapter_for(model).find_routers(model)


@dataclass
class _LayerRules:
    """The interventions of one MoE layer, as ``fused_route`` keyword arguments (CPU master copy).

    ``long_paths``: prefix length n -> (prefixes int64 [R, n] oldest first, targets int64 [R]).
    """

    kernel: dict[str, torch.Tensor]
    long_paths: dict[int, tuple[torch.Tensor, torch.Tensor]]
    _on_device: dict[torch.device, tuple[dict, dict]] = field(default_factory=dict)

    def on(self, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
        """(kernel kwargs, long_paths) on ``device``, cached."""
        if device not in self._on_device:
            kernel = {k: v.to(device) for k, v in self.kernel.items()}
            long_paths = {n: (p.to(device), t.to(device)) for n, (p, t) in self.long_paths.items()}
            self._on_device[device] = (kernel, long_paths)
        return self._on_device[device]


def _check_selectable(targets: Targets, sites: Sequence[RouterSite]) -> None:
    """Reroute mode: raise MoetraceError unless every token keeps enough selectable experts at
    every layer, whatever its previous top-1 experts (checked once, when a context is entered).

    A layer needs K experts (K + 1 with pair rules) outside the union of its expert mask and the
    path rules that can fire together. The rules that fire for a token are those whose prefix is a
    suffix of its history, so every such set is the set of a longest firing prefix P: the rules
    whose prefix is a suffix of P. With group-limited selection the worst case is the
    ``topk_group`` groups with the fewest free experts among those the router can keep (a group
    with fewer than 2 free experts scores -inf and is kept only when too few others score
    finite), which must hold the K (K + 1).
    """
    if targets.mask_mode != "reroute":
        return
    for site in sites:
        layer, spec = site.layer_id, site.spec
        E, K = spec.n_experts, spec.top_k
        need = K + (1 if targets.pairs.get(layer) and K >= 2 else 0)
        base = set(targets.experts.get(layer, []))
        by_prefix: dict[tuple[int, ...], set[int]] = {}
        for prefix, target in targets.paths.get(layer, []):
            by_prefix.setdefault(tuple(prefix), set()).add(target)
        cases: list[tuple[set[int], tuple[int, ...] | None]] = [(base, None)]
        for prefix in by_prefix:
            fired = set().union(*(by_prefix.get(prefix[i:], set()) for i in range(len(prefix))))
            cases.append((base | fired, prefix))
        for masked, prefix in cases:
            free = E - len(masked)
            if spec.n_group is not None:
                size = E // spec.n_group
                per_group = [size - sum(1 for e in masked if e // size == g) for g in range(spec.n_group)]
                # a group scores the sum of its two best selection scores: with fewer than 2 free experts
                # it scores -inf and is kept only when fewer than topk_group groups score finite
                scoring = sorted(f for f in per_group if f >= 2)
                short = sorted(f for f in per_group if f < 2)
                kept = scoring[: spec.topk_group] + short[: max(0, spec.topk_group - len(scoring))]
                free = min(free, sum(kept))
            if free < need:
                rule = "its expert mask" if prefix is None else \
                    f"its expert mask and the path rules that fire after the top-1 experts {list(prefix)}"
                where = f" in its {spec.topk_group} worst kept groups" if spec.n_group is not None else ""
                raise MoetraceError(
                    f"targets: layer {layer}: {rule} leave {free} selectable experts{where}, "
                    f"top_k = {K} needs {need}{' (pair rules may drop one more)' if need > K else ''} "
                    f"(masked: {sorted(masked)})"
                )


def _layer_rules(targets: Targets, sites: Sequence[RouterSite]) -> list[_LayerRules | None]:
    """Per MoE layer position, the dense intervention tables of ``targets`` (None: no rule).

    Raises MoetraceError for targets outside the model or leaving too few selectable experts.
    """
    layer_ids = [site.layer_id for site in sites]
    n_experts = sites[0].spec.n_experts
    targets.validate(layer_ids, n_experts)
    _check_selectable(targets, sites)
    short = Targets(paths={layer: [r for r in rules if len(r[0]) == 1] for layer, rules in targets.paths.items()})
    experts = torch.from_numpy(targets.expert_table(layer_ids, n_experts))
    paths = torch.from_numpy(short.path_table(layer_ids, n_experts))
    pairs = torch.from_numpy(targets.pair_table(layer_ids, n_experts))
    logit_add, scale = (torch.from_numpy(a) for a in targets.boost_arrays(layer_ids, n_experts))
    out: list[_LayerRules | None] = []
    for i, layer in enumerate(layer_ids):
        kernel = {}
        if experts[i].any():
            kernel["expert_mask"] = experts[i]
        if paths[i].any():
            kernel["path_table"] = paths[i]
        if pairs[i].any():
            kernel["pair_table"] = pairs[i]
        if (logit_add[i] != 0).any():
            kernel["logit_boost"] = logit_add[i]
        if (scale[i] != 1).any():
            kernel["weight_scale"] = scale[i]
        long_paths = {}
        for n in sorted({len(prefix) for prefix, _ in targets.paths.get(layer, []) if len(prefix) > 1}):
            rules = [(prefix, target) for prefix, target in targets.paths[layer] if len(prefix) == n]
            long_paths[n] = (torch.tensor([p for p, _ in rules], dtype=torch.int64),
                             torch.tensor([t for _, t in rules], dtype=torch.int64))
        out.append(_LayerRules(kernel, long_paths) if kernel or long_paths else None)
    return out


@dataclass(eq=False)
class _Entry:
    """One open ``patch_routers`` context: its rules (None = no targets given) and observer.

    Compared by identity (``eq=False``): leaving a context removes exactly its own entry, even
    when a nested context on the same routers holds equal-looking rules (dicts of tensors).
    """

    rules: list[_LayerRules | None] | None
    mask_mode: str
    observer: Observer | None
    backend: str
    override: Override | None = None
    targets: Targets | None = None

    def describe(self) -> dict | None:
        """What this context changes in the routing, as JSON-ready data (None: it only observes)."""
        if self.override is not None:
            return {"override": getattr(self.override, "__qualname__", type(self.override).__qualname__)}
        if self.targets is not None and self.rules is not None:
            return {"targets": self.targets.to_dict()}
        return None


class RoutingPatch:
    """The live patch of a set of router modules, shared by every open context that reaches them.

    ``sites``: the routers in layer order; ``adapter``: their family adapter. There is at most
    one patch per router module (``_PATCHES`` is keyed on the router modules), so contexts opened
    on ``model`` and on ``model.model`` share it: every observer sees every layer and the
    innermost targets apply, whichever root each context was given.
    """

    def __init__(self, adapter: RouterAdapter, sites: list[RouterSite]):
        self.adapter = adapter
        self.sites = sites
        self.entries: list[_Entry] = []
        self._history: list[torch.Tensor | None] = [None] * len(sites)
        self._saved: list[tuple[nn.Module, Any]] = []

    # ---- install / restore -------------------------------------------------------------

    def install(self) -> None:
        """Set every router's instance ``forward`` to the patched one (remembering the old)."""
        for site in self.sites:
            module = site.module
            self._saved.append((module, module.__dict__.get("forward")))
            module.forward = self._patched_forward(site)
            _PATCHES[module] = self

    def restore(self) -> None:
        """Put every router's original ``forward`` back."""
        for module, previous in self._saved:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
            if _PATCHES.get(module) is self:
                del _PATCHES[module]
        self._saved.clear()

    def _patched_forward(self, site: RouterSite) -> Callable[..., tuple]:
        def forward(*args: Any, **kwargs: Any) -> tuple:
            return self.route(site, args, kwargs)

        return forward

    # ---- the routing step --------------------------------------------------------------

    def _active(self) -> tuple[_Entry | None, list[Observer], Override | None]:
        active = next((e for e in reversed(self.entries) if e.rules is not None), None)
        observers = [e.observer for e in self.entries if e.observer is not None]
        override = next((e.override for e in reversed(self.entries) if e.override is not None), None)
        return active, observers, override

    def route(self, site: RouterSite, args: tuple, kwargs: dict[str, Any]) -> tuple:
        """The patched router forward: ``(router_logits [.., E], weights [.., K], indices [.., K] int64)``."""
        adapter, spec, router = self.adapter, site.spec, site.module
        hidden = adapter.hidden_states(args, kwargs)
        logits = adapter.logits(router, hidden)
        flat = logits.reshape(-1, spec.n_experts)
        active, observers, override = self._active()
        pos = site.position
        if pos == 0:
            self._history = [None] * len(self.sites)
        extra: dict[str, Any] = {}
        rules = active.rules[pos] if active is not None else None
        if rules is not None:
            extra = self._interventions(site, rules, flat)
            extra["mask_mode"] = active.mask_mode
        backend = active.backend if active is not None else (self.entries[-1].backend if self.entries else "auto")
        try:
            weights, experts, top1 = fused_route(
                flat,
                spec.top_k,
                renormalize=spec.renormalize,
                scoring=spec.scoring,
                bias=adapter.selection_bias(router, args, kwargs),
                n_group=spec.n_group,
                topk_group=spec.topk_group,
                routed_scaling=spec.routed_scaling,
                backend=backend,
                validate=False,  # checked when the context was entered: no host sync per forward
                **extra,
            )
        except ValueError as err:
            raise MoetraceError(f"router {site.name!r} (layer {site.layer_id}): {err}") from err
        if override is not None:
            weights, experts = override(site, flat, weights, experts)
            top1 = experts[:, 0].contiguous()
        self._history[pos] = top1
        if observers:
            event = RouteEvent(site.layer_id, pos, experts, weights.detach(), flat.detach(), spec.scoring)
            for observer in observers:
                observer(event)
        lead = logits.shape[:-1]
        out_weights = weights.to(adapter.output_dtype(logits, hidden)).reshape(*lead, spec.top_k)
        return logits, out_weights, experts.long().reshape(*lead, spec.top_k)

    def _previous(self, site: RouterSite, back: int, n_tokens: int) -> torch.Tensor:
        """int32 [T]: the top-1 routed by the MoE layer ``back`` positions before ``site``."""
        prev = self._history[site.position - back]
        if prev is None or prev.shape[0] != n_tokens:
            got = "nothing" if prev is None else f"{prev.shape[0]} tokens"
            raise MoetraceError(
                f"router {site.name!r} (layer {site.layer_id}): path rules need the top-1 of the MoE layer "
                f"{back} before it for the same {n_tokens} tokens in this forward, got {got}"
            )
        return prev

    def _interventions(self, site: RouterSite, rules: _LayerRules, flat: torch.Tensor) -> dict[str, Any]:
        """``fused_route`` keyword arguments for this layer and these tokens."""
        kernel, long_paths = rules.on(flat.device)
        extra = dict(kernel)
        n_tokens, n_experts = flat.shape
        if "path_table" in extra:
            extra["prev_top1"] = self._previous(site, 1, n_tokens)
        if long_paths:
            history = {n: torch.stack([self._previous(site, b, n_tokens) for b in range(n, 0, -1)], dim=1)
                       for n in long_paths}
            mask = torch.zeros(n_tokens, n_experts, dtype=torch.bool, device=flat.device)
            for n, (prefixes, targets) in long_paths.items():
                match = (history[n].long()[:, None, :] == prefixes[None, :, :]).all(dim=-1)  # [T, R]
                hits = torch.zeros(n_tokens, n_experts, dtype=torch.int32, device=flat.device)
                hits.index_add_(1, targets, match.to(torch.int32))
                mask |= hits > 0
            if "expert_mask" in extra:
                mask |= extra["expert_mask"][None, :]
            extra["expert_mask"] = mask
        return extra


# router module -> the live patch that owns it (one patch per router, whatever root reached it)
_PATCHES: weakref.WeakKeyDictionary[nn.Module, RoutingPatch] = weakref.WeakKeyDictionary()


def _shared_patch(model: nn.Module) -> RoutingPatch:
    """The live patch of ``model``'s routers, or a new (not yet installed) one.

    Raises MoetraceError when some of the routers are already patched together with a
    different set of routers (a context opened on another root that reaches other routers).
    """
    adapter = adapter_for(model)
    sites = adapter.find_routers(model)
    live = {id(p): p for p in (_PATCHES.get(site.module) for site in sites) if p is not None}
    if not live:
        return RoutingPatch(adapter, sites)
    patch = next(iter(live.values()))
    same = len(live) == 1 and [s.module for s in patch.sites] == [s.module for s in sites] \
        and [s.layer_id for s in patch.sites] == [s.layer_id for s in sites]
    if not same:
        raise MoetraceError(
            f"model {type(model).__name__}: expected its routers {[s.name for s in sites]} to be patched "
            f"together or not at all, got some already patched with the routers "
            f"{[s.name for s in patch.sites]} of another context; open every context on the same model"
        )
    return patch


@contextmanager
def patch_routers(
    model: nn.Module,
    targets: Targets | None = None,
    *,
    observer: Observer | None = None,
    backend: str = "auto",
    override: Override | None = None,
) -> Iterator[RoutingPatch]:
    """Patch every router of ``model`` for the duration of the block.

    Args:
        model: a transformers MoE model of a supported family (``moetrace.models``).
        targets: interventions (None: route as the model does; an empty ``Targets()`` too).
        observer: called as ``observer(RouteEvent)`` after every MoE layer of every forward.
        backend: ``fused_route`` backend: "auto" (Triton on CUDA, torch otherwise), "torch", "triton".
        override: replaces each layer's routing after the live one (module docstring, "Route overrides").
    Yields the model's ``RoutingPatch``. Raises MoetraceError for an unsupported model, targets
    naming layers/experts the model does not have, or reroute targets that can leave a token fewer
    than K selectable experts at some layer (K + 1 with pair rules), before anything is patched.
    """
    if backend not in ("auto", "torch", "triton"):
        raise MoetraceError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
    patch = _shared_patch(model)
    rules = None
    mask_mode = "reroute"
    if targets is not None:
        if not isinstance(targets, Targets):
            raise MoetraceError(f"targets: expected an moetrace.targets.Targets, got {type(targets).__name__}")
        rules = _layer_rules(targets, patch.sites)
        mask_mode = targets.mask_mode
    entry = _Entry(rules=rules, mask_mode=mask_mode, observer=observer, backend=backend, override=override,
                   targets=targets)
    if not patch.entries:
        patch.install()
    patch.entries.append(entry)
    try:
        yield patch
    finally:
        patch.entries[:] = [e for e in patch.entries if e is not entry]
        if not patch.entries:
            patch.restore()


def active_interventions(routers: Sequence[nn.Module]) -> tuple[dict, ...]:
    """What changes the routing of these router modules now: one entry per open ``intervene`` /
    ``ablate`` / ``steer`` / ``replay`` context on them, outermost first (``{"targets": ...}`` or
    ``{"override": name}``); ``()`` when they route as the model does. Host-side Python only (what
    capture records with each batch)."""
    patch = _PATCHES.get(routers[0]) if routers else None
    if patch is None:
        return ()
    return tuple(d for d in (e.describe() for e in patch.entries) if d is not None)


def describe_intervention(what: Mapping[str, Any]) -> str:
    """One entry of :func:`active_interventions` in a few words (what ``moetrace info`` and the report show)."""
    if "override" in what:
        return f"routes overridden ({what['override']})"
    t = what.get("targets", {})

    def n(count: int, kind: str) -> str:
        return f"{count} {kind if count != 1 else kind[:-1]}"

    parts = [f"{n(sum(len(v) for v in t.get(kind, {}).values()), kind)} masked ({t.get('mask_mode', 'reroute')})"
             for kind in ("experts", "paths", "pairs") if t.get(kind)]
    boosts = sum(len(v) for v in t.get("boosts", {}).values())
    if boosts:
        parts.append(f"{n(boosts, 'experts')} boosted or scaled")
    return ", ".join(parts) or "targets without rules"


def intervene(model: nn.Module, targets: Targets, *, backend: str = "auto"):
    """Context manager: route every MoE layer of ``model`` under ``targets`` (see module docstring).

    ``with intervene(model, targets): model(...)`` / ``model.generate(...)`` / a training step;
    with an empty ``Targets()`` the outputs equal the unpatched model's.
    """
    return patch_routers(model, targets, backend=backend)


def observe_routing(model: nn.Module, observer: Observer, *, backend: str = "auto"):
    """Context manager: call ``observer(RouteEvent)`` for every MoE layer of every forward,
    without changing the routing (composes with an enclosing ``intervene``)."""
    return patch_routers(model, None, observer=observer, backend=backend)


def ablate(
    model: nn.Module,
    experts: Mapping[int, Sequence[int]] | None = None,
    paths: Mapping[int, Sequence[tuple[Sequence[int], int]]] | None = None,
    pairs: Mapping[int, Sequence[tuple[int, int]]] | None = None,
    mode: str = "reroute",
    *,
    backend: str = "auto",
):
    """``intervene`` with masks: ``experts`` {layer: [expert]}, ``paths`` {layer: [(prefix, target)]},
    ``pairs`` {layer: [(first, second)]}; ``mode`` "reroute" or "zero" (see ``Targets``)."""
    targets = Targets(experts=dict(experts or {}), paths=dict(paths or {}), pairs=dict(pairs or {}), mask_mode=mode)
    return intervene(model, targets, backend=backend)


def steer(model: nn.Module, layer: int, expert: int, logit: float = 0.0, scale: float = 1.0, *,
          backend: str = "auto"):
    """``intervene`` that adds ``logit`` to ``expert``'s router logit (sigmoid routers: to its
    selection score) at ``layer`` and multiplies its routing weight by ``scale``."""
    targets = Targets(boosts={layer: {expert: {"logit": logit, "scale": scale}}})
    return intervene(model, targets, backend=backend)
