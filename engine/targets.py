"""Intervention targets: which experts, expert paths and expert pairs to mask, and which to boost.

A :class:`Targets` is what ``moetrace.intervene`` applies inside the model's routers and what
``moetrace specialize`` writes. Layers are model layer ids (the ``layer`` coordinate of a
Counts dataset, the ``layer_ids`` of a trace store), experts are expert ids.

Rules (applied per token at a recorded MoE layer):
  - ``experts[l]``: expert ids masked at layer l (``mask_mode="reroute"``: they get -inf
    before top-k, so the token goes to its next-best expert; ``"zero"``: they stay selected
    with weight 0).
  - ``paths[l]``: (prefix, target) rules. prefix = the top-1 experts at the recorded layers
    just before l, oldest first (length 1 = the previous recorded layer only); a token whose
    previous top-1 experts equal the prefix gets ``target`` masked at layer l.
  - ``pairs[l]``: ordered (first, second): a token whose rank-0 and rank-1 experts are
    (first, second) gets ``second`` masked at layer l.
  - ``boosts[l][e]``: ``{"logit": a, "scale": s}``: add a to expert e's router logit, multiply
    its routing weight by s (defaults 0 and 1).

JSON formats:
  - combined (``save`` / ``load()``): ``{"format": "moetrace.targets/1", "paths": {...},
    "experts": {...}, "pairs": {...}, "boosts": {"<layer>": {"<expert>": {"logit": a, "scale": s}}},
    "mask_mode": "reroute"}``, where paths / experts / pairs use the bare encodings below;
  - bare, seed 000's export (``save_bare`` / ``load(kind=...)``): ``{"<layer>": [...]}`` with
    items ``[prefix, target]`` for paths (a length-1 prefix written as a bare integer, as R's
    ``jsonlite::toJSON(auto_unbox = T)`` does, a longer one as a list), expert ids for experts,
    ``[first, second]`` for pairs; written compact like ``pretty = F``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.kernels.modes import MASK_MODES

FORMAT = "moetrace.targets/1"
KINDS = ("paths", "experts", "pairs")

Path_ = tuple[tuple[int, ...], int]


def _int(value: Any, where: str) -> int:
    """An id: a JSON/Python integer >= 0 (bool and float rejected)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise MoetraceError(f"{where}: expected a non-negative integer id, got {value!r}")
    if value < 0:
        raise MoetraceError(f"{where}: expected a non-negative integer id, got {value}")
    return int(value)


def _layer_key(key: Any, where: str) -> int:
    if isinstance(key, str):
        if re.fullmatch(r"[0-9]+", key) is None:
            raise MoetraceError(f"{where}: expected a layer id (non-negative integer), got key {key!r}")
        return int(key)
    return _int(key, where)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise MoetraceError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise MoetraceError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _path_item(item: Any, where: str) -> Path_:
    """``[prefix, target]`` with prefix an int (length 1) or a non-empty list of ints."""
    if isinstance(item, tuple):
        item = list(item)
    if not isinstance(item, list) or len(item) != 2:
        raise MoetraceError(f"{where}: expected a path rule [prefix, target], got {item!r}")
    prefix, target = item
    if isinstance(prefix, (list, tuple)):
        if len(prefix) == 0:
            raise MoetraceError(f"{where}: expected a non-empty prefix of expert ids, got []")
        prefix_ids = tuple(_int(p, f"{where} prefix") for p in prefix)
    else:
        prefix_ids = (_int(prefix, f"{where} prefix"),)
    return prefix_ids, _int(target, f"{where} target")


def _pair_item(item: Any, where: str) -> tuple[int, int]:
    if isinstance(item, tuple):
        item = list(item)
    if not isinstance(item, list) or len(item) != 2:
        raise MoetraceError(f"{where}: expected a pair [first, second], got {item!r}")
    return _int(item[0], f"{where} first"), _int(item[1], f"{where} second")


def _layer_dict(value: Any, where: str) -> dict:
    """A ``{"<layer>": ...}`` mapping; an empty JSON list is accepted as empty (R's empty list)."""
    if isinstance(value, list) and not value:
        return {}
    if not isinstance(value, Mapping):
        raise MoetraceError(f"{where}: expected an object {{\"<layer>\": [...]}}, got {type(value).__name__}")
    return dict(value)


def _parse_kind(kind: str, value: Any, where: str) -> dict:
    """Parse one kind's ``{"<layer>": [...]}`` into {layer: sorted unique items}."""
    out: dict[int, list] = {}
    for key, items in _layer_dict(value, where).items():
        layer = _layer_key(key, where)
        at = f"{where}[{key!r}]"
        if kind == "experts" and not isinstance(items, (list, tuple)):
            items = [items]  # auto_unbox writes a single expert as a bare integer
        if not isinstance(items, (list, tuple)):
            raise MoetraceError(f"{at}: expected a list of {kind} rules, got {items!r}")
        if kind == "paths":
            parsed = [_path_item(it, f"{at}[{i}]") for i, it in enumerate(items)]
        elif kind == "pairs":
            parsed = [_pair_item(it, f"{at}[{i}]") for i, it in enumerate(items)]
        else:
            parsed = [_int(it, f"{at}[{i}]") for i, it in enumerate(items)]
        out[layer] = parsed
    return out


def _parse_boosts(value: Any, where: str) -> dict[int, dict[int, dict]]:
    out: dict[int, dict[int, dict]] = {}
    for key, experts in _layer_dict(value, where).items():
        layer = _layer_key(key, where)
        if not isinstance(experts, Mapping):
            raise MoetraceError(f"{where}[{key!r}]: expected an object {{\"<expert>\": {{...}}}}, got {experts!r}")
        out[layer] = {}
        for ekey, spec in experts.items():
            at = f"{where}[{key!r}][{ekey!r}]"
            expert = _layer_key(ekey, at)
            if not isinstance(spec, Mapping) or not spec or set(spec) - {"logit", "scale"}:
                raise MoetraceError(f"{at}: expected {{\"logit\": number, \"scale\": number}}, got {spec!r}")
            out[layer][expert] = {
                "logit": _number(spec.get("logit", 0.0), f"{at}.logit"),
                "scale": _number(spec.get("scale", 1.0), f"{at}.scale"),
            }
    return out


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoetraceError(f"{path}: targets file not found") from None
    except UnicodeDecodeError as exc:
        raise MoetraceError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected a JSON "
                            f"targets file") from None
    except OSError as exc:
        raise MoetraceError(f"{path}: cannot read targets file ({exc.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MoetraceError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise MoetraceError(f"{path}: JSON nested too deeply to be a targets file (expected "
                            f"{{\"<layer>\": [...]}} or the combined format)") from None


def _unique_sorted(items: Iterable) -> list:
    return sorted(set(items))


@dataclass
class Targets:
    """Routing interventions, keyed by model layer id (see the module docstring).

    experts: layer -> masked expert ids.
    paths: layer -> [(prefix expert ids at the preceding recorded layers, oldest first; target)].
    pairs: layer -> [(first, second)] ordered rank-0/rank-1 pairs whose second is masked.
    boosts: layer -> expert -> {"logit": added to the router logit, "scale": weight factor}.
    mask_mode: "reroute" (mask before top-k) or "zero" (keep the selection, weight 0).
    Rules are stored sorted and de-duplicated; layers without rules are dropped.
    ``Targets()`` is the empty intervention.
    """

    experts: dict[int, list[int]] = field(default_factory=dict)
    paths: dict[int, list[Path_]] = field(default_factory=dict)
    pairs: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    boosts: dict[int, dict[int, dict]] = field(default_factory=dict)
    mask_mode: str = "reroute"

    def __post_init__(self) -> None:
        if self.mask_mode not in MASK_MODES:
            raise MoetraceError(f"mask_mode: expected one of {list(MASK_MODES)}, got {self.mask_mode!r}")
        self.experts = {
            layer: _unique_sorted(items)
            for layer, items in sorted(_parse_kind("experts", _plain(self.experts), "experts").items())
            if items
        }
        self.paths = {
            layer: _unique_sorted(items)
            for layer, items in sorted(_parse_kind("paths", _plain(self.paths), "paths").items())
            if items
        }
        self.pairs = {
            layer: _unique_sorted(items)
            for layer, items in sorted(_parse_kind("pairs", _plain(self.pairs), "pairs").items())
            if items
        }
        self.boosts = {
            layer: dict(sorted(experts.items()))
            for layer, experts in sorted(_parse_boosts(self.boosts, "boosts").items())
            if experts
        }

    # -- queries -------------------------------------------------------------------------------

    def is_empty(self) -> bool:
        """True when there is nothing to mask or boost (the model runs unchanged)."""
        return not (self.experts or self.paths or self.pairs or self.boosts)

    def layers(self) -> list[int]:
        """Sorted layer ids that carry any rule."""
        return sorted(set(self.experts) | set(self.paths) | set(self.pairs) | set(self.boosts))

    def max_prefix_len(self) -> int:
        """Longest path prefix (0 without path rules)."""
        return max((len(prefix) for items in self.paths.values() for prefix, _ in items), default=0)

    def n_rules(self) -> dict[str, int]:
        """Number of rules per kind: {"experts", "paths", "pairs", "boosts"} -> int."""
        return {
            "experts": sum(len(v) for v in self.experts.values()),
            "paths": sum(len(v) for v in self.paths.values()),
            "pairs": sum(len(v) for v in self.pairs.values()),
            "boosts": sum(len(v) for v in self.boosts.values()),
        }

    def validate(self, layer_ids: Sequence[int], n_experts: int) -> None:
        """Check every layer is in ``layer_ids`` and every expert id is < ``n_experts``.

        A path rule whose prefix is longer than the number of recorded layers before its
        target layer can never match, and is an error too.
        """
        layer_ids = [int(x) for x in layer_ids]
        position = {layer: i for i, layer in enumerate(layer_ids)}
        for kind in ("experts", "paths", "pairs", "boosts"):
            for layer, items in getattr(self, kind).items():
                if layer not in position:
                    raise MoetraceError(f"targets {kind}: layer {layer} is not a recorded MoE layer {layer_ids}")
                ids: list[int] = []
                if kind == "experts":
                    ids = list(items)
                elif kind == "paths":
                    for prefix, target in items:
                        if len(prefix) > position[layer]:
                            raise MoetraceError(
                                f"targets paths: layer {layer} has a prefix of {len(prefix)} experts but only "
                                f"{position[layer]} recorded layers before it"
                            )
                        ids.extend([*prefix, target])
                elif kind == "pairs":
                    ids = [e for pair in items for e in pair]
                else:
                    ids = list(items)
                bad = [e for e in ids if e >= n_experts]
                if bad:
                    raise MoetraceError(
                        f"targets {kind}: layer {layer} names expert {bad[0]}, expected ids below {n_experts}"
                    )

    # -- dense tables for counting and the routing kernel ---------------------------------------

    def _positions(self, layer_ids: Sequence[int], n_experts: int) -> dict[int, int]:
        self.validate(layer_ids, n_experts)
        return {int(layer): i for i, layer in enumerate(layer_ids)}

    def expert_table(self, layer_ids: Sequence[int], n_experts: int) -> np.ndarray:
        """bool [L, E]: True where expert e is masked at ``layer_ids[l]``."""
        pos = self._positions(layer_ids, n_experts)
        table = np.zeros((len(pos), n_experts), dtype=np.bool_)
        for layer, items in self.experts.items():
            table[pos[layer], items] = True
        return table

    def path_table(self, layer_ids: Sequence[int], n_experts: int) -> np.ndarray:
        """bool [L, E, E]: [l, prev, target] True when a token whose top-1 at the previous
        recorded layer is ``prev`` gets ``target`` masked at ``layer_ids[l]``.

        Only length-1 prefixes fit this table; raises MoetraceError when ``max_prefix_len() > 1``.
        """
        if self.max_prefix_len() > 1:
            raise MoetraceError(
                f"targets paths: prefixes of up to {self.max_prefix_len()} experts do not fit a [L, E, E] table; "
                "expected prefixes of length 1"
            )
        pos = self._positions(layer_ids, n_experts)
        table = np.zeros((len(pos), n_experts, n_experts), dtype=np.bool_)
        for layer, items in self.paths.items():
            if items:
                prev = [prefix[0] for prefix, _ in items]
                target = [t for _, t in items]
                table[pos[layer], prev, target] = True
        return table

    def pair_table(self, layer_ids: Sequence[int], n_experts: int) -> np.ndarray:
        """bool [L, E, E]: [l, first, second] True when a token routed (first, second) at
        ranks 0 and 1 gets ``second`` masked at ``layer_ids[l]``."""
        pos = self._positions(layer_ids, n_experts)
        table = np.zeros((len(pos), n_experts, n_experts), dtype=np.bool_)
        for layer, items in self.pairs.items():
            if items:
                first, second = zip(*items)
                table[pos[layer], list(first), list(second)] = True
        return table

    def boost_arrays(self, layer_ids: Sequence[int], n_experts: int) -> tuple[np.ndarray, np.ndarray]:
        """(logit_add float32 [L, E] (0 = unchanged), scale float32 [L, E] (1 = unchanged))."""
        pos = self._positions(layer_ids, n_experts)
        logit_add = np.zeros((len(pos), n_experts), dtype=np.float32)
        scale = np.ones((len(pos), n_experts), dtype=np.float32)
        for layer, experts in self.boosts.items():
            for expert, spec in experts.items():
                logit_add[pos[layer], expert] = spec["logit"]
                scale[pos[layer], expert] = spec["scale"]
        return logit_add, scale

    # -- construction and combination -------------------------------------------------------------

    @classmethod
    def from_specialized(cls, method: str, items, mask_mode: str = "reroute") -> Targets:
        """Targets from :func:`moetrace.metrics.specialized` output (a ``Selection``, or any object
        with int arrays ``layer`` [n] and ``items`` [n, w]).

        method "paths": items (prev_expert, expert) -> path rule ((prev_expert,), expert);
        "experts": (expert,) -> masked expert; "pairs": (first, second) -> pair rule.
        """
        if method not in KINDS:
            raise MoetraceError(f"method: expected one of {list(KINDS)}, got {method!r}")
        width = {"paths": 2, "experts": 1, "pairs": 2}[method]
        layers = np.asarray(items.layer, dtype=np.int64).reshape(-1)
        if layers.size == 0:
            return cls(mask_mode=mask_mode)  # nothing specialized: the empty intervention
        rows = np.asarray(items.items, dtype=np.int64).reshape(layers.shape[0], -1)
        if rows.shape[1] != width:
            raise MoetraceError(f"items: expected {width} expert ids per {method} item, got {rows.shape[1]}")
        rules: dict[int, list] = {}
        for layer, row in zip(layers.tolist(), rows.tolist()):
            if method == "paths":
                rules.setdefault(layer, []).append(((row[0],), row[1]))
            elif method == "pairs":
                rules.setdefault(layer, []).append((row[0], row[1]))
            else:
                rules.setdefault(layer, []).append(row[0])
        return cls(**{method: rules}, mask_mode=mask_mode)

    def merge(self, other: Targets) -> Targets:
        """Union of two target sets. Boosts of the same (layer, expert) must agree, and so
        must ``mask_mode`` unless one side has no masks."""
        if not isinstance(other, Targets):
            raise MoetraceError(f"merge: expected Targets, got {type(other).__name__}")
        has_masks = [bool(t.experts or t.paths or t.pairs) for t in (self, other)]
        if self.mask_mode != other.mask_mode and all(has_masks):
            raise MoetraceError(f"merge: mask_mode differs ({self.mask_mode!r} vs {other.mask_mode!r})")
        mask_mode = self.mask_mode if has_masks[0] or not has_masks[1] else other.mask_mode

        def union(a: dict, b: dict) -> dict:
            return {k: list(a.get(k, [])) + list(b.get(k, [])) for k in set(a) | set(b)}

        boosts = {layer: dict(experts) for layer, experts in self.boosts.items()}
        for layer, experts in other.boosts.items():
            for expert, spec in experts.items():
                old = boosts.setdefault(layer, {}).get(expert)
                if old is not None and old != spec:
                    raise MoetraceError(f"merge: boosts of layer {layer} expert {expert} differ ({old} vs {spec})")
                boosts[layer][expert] = spec
        return Targets(
            experts=union(self.experts, other.experts),
            paths=union(self.paths, other.paths),
            pairs=union(self.pairs, other.pairs),
            boosts=boosts,
            mask_mode=mask_mode,
        )

    def __or__(self, other: Targets) -> Targets:
        return self.merge(other)

    # -- JSON ------------------------------------------------------------------------------------

    def _bare(self, kind: str) -> dict[str, list]:
        if kind == "paths":
            return {
                str(layer): [[list(p) if len(p) > 1 else p[0], t] for p, t in items]
                for layer, items in self.paths.items()
            }
        if kind == "pairs":
            return {str(layer): [list(pair) for pair in items] for layer, items in self.pairs.items()}
        return {str(layer): list(items) for layer, items in self.experts.items()}

    def to_dict(self) -> dict:
        """The combined JSON object (what :meth:`save` writes)."""
        return {
            "format": FORMAT,
            "paths": self._bare("paths"),
            "experts": self._bare("experts"),
            "pairs": self._bare("pairs"),
            "boosts": {
                str(layer): {str(e): dict(spec) for e, spec in experts.items()}
                for layer, experts in self.boosts.items()
            },
            "mask_mode": self.mask_mode,
        }

    def save(self, path: str | Path) -> None:
        """Write the combined format ``{"format": "moetrace.targets/1", ...}`` (indented JSON)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def bare_json(self, kind: str) -> str:
        """Seed 000's bare ``{"<layer>": [...]}`` for one kind, compact like jsonlite ``pretty = F``."""
        if kind not in KINDS:
            raise MoetraceError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
        other = [k for k in KINDS if k != kind and getattr(self, k)]
        if other or self.boosts:
            raise MoetraceError(
                f"save_bare: a bare {kind} file cannot hold the {', '.join(other + (['boosts'] if self.boosts else []))} "
                "rules of these targets; use save() for the combined format"
            )
        return json.dumps(self._bare(kind), separators=(",", ":"))

    def save_bare(self, path: str | Path, kind: str) -> None:
        """Write seed 000's bare format for ``kind`` (compact JSON and a newline, like R's
        ``writeLines(jsonlite::toJSON(..., auto_unbox = T, pretty = F))``)."""
        text = self.bare_json(kind)
        Path(path).write_text(text + "\n")

    @classmethod
    def from_dict(cls, data: Any, kind: str | None = None, where: str = "targets") -> Targets:
        """Targets from a parsed JSON object: a bare ``kind`` file, or the combined format."""
        if kind is not None:
            if kind not in KINDS:
                raise MoetraceError(f"kind: expected one of {list(KINDS)} or None, got {kind!r}")
            if isinstance(data, Mapping) and "format" in data:
                raise MoetraceError(f"{where}: this is a combined targets file; load it without kind={kind!r}")
            return cls(**{kind: _parse_kind(kind, data, where)})
        if not isinstance(data, Mapping):
            raise MoetraceError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt is None:
            raise MoetraceError(
                f"{where}: no \"format\" key; expected {FORMAT!r}, or pass kind='paths'|'experts'|'pairs' "
                "for a bare seed-000 file"
            )
        if fmt != FORMAT:
            raise MoetraceError(f"{where}: unknown format {fmt!r}; expected {FORMAT!r}")
        unknown = set(data) - {"format", "paths", "experts", "pairs", "boosts", "mask_mode"}
        if unknown:
            raise MoetraceError(f"{where}: unknown keys {sorted(unknown)}")
        return cls(
            experts=_parse_kind("experts", data.get("experts", {}), f"{where} experts"),
            paths=_parse_kind("paths", data.get("paths", {}), f"{where} paths"),
            pairs=_parse_kind("pairs", data.get("pairs", {}), f"{where} pairs"),
            boosts=_parse_boosts(data.get("boosts", {}), f"{where} boosts"),
            mask_mode=data.get("mask_mode", "reroute"),
        )

    @classmethod
    def load(cls, path: str | Path, kind: str | None = None) -> Targets:
        """Read targets JSON. kind="paths"|"experts"|"pairs": a bare seed-000 file
        ``{"<layer>": [...]}`` (seed 000's ``path_ablation_targets.json`` loads unchanged);
        kind=None: the combined format written by :meth:`save`."""
        return cls.from_dict(_read_json(path), kind=kind, where=str(path))


def _plain(rules: Mapping) -> dict:
    """Rules as given in Python (tuples allowed) in the shape the JSON parsers take."""
    if not isinstance(rules, Mapping):
        raise MoetraceError(f"targets: expected a dict layer -> rules, got {type(rules).__name__}")
    out = {}
    for layer, items in rules.items():
        if isinstance(items, (list, tuple)):
            out[layer] = [list(it) if isinstance(it, tuple) else it for it in items]
        else:
            out[layer] = items
    return out
