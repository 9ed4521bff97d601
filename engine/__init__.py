"""moetrace: capture, store, count, analyze and intervene on MoE routing.

From a notebook, ``import moetrace as mt`` gives (each loaded on first use, so the import itself
stays fast; ``T`` tokens, ``L`` MoE layers, ``K`` experts per token, ``E`` experts per layer):

- ``mt.load_model(name)`` -> ``(model, tokenizer)``: ``"demo"`` (the shipped demo model, no
  download), a checkpoint directory or a hub id;
- ``with mt.capture(model, "trace.zarr", labels=[...]) as cap: model(input_ids)``: every forward's
  routing into a trace store, one row per token: ``routing/experts [T, L, K]``, ``routing/weights
  [T, L, K]``, ``tokens/seq``, ``tokens/pos``, labels per sequence;
- ``mt.capture_texts(model, tokenizer, rows, "trace.zarr", labels=[...])``: the same over a list
  of dicts with ``text`` (or ``input_ids``) and the labels, batched, with a progress bar;
  ``mt.demo.make_texts(n_per_group)`` makes such rows for the demo model;
- ``mt.open_store(path)`` / ``mt.TraceStore``: read a store (``len(store)`` = T);
- ``mt.count(store, stats=["experts", "paths"], by=["domain"])`` -> ``xarray.Dataset``: counts
  per statistic, e.g. ``experts [domain, layer, rank, expert]``, ``paths [domain, layer,
  prev_expert, expert]``; ``mt.load_counts(path)`` / ``mt.save_counts(ds, path)``;
- ``mt.metrics``: seed 000 / 002 metrics of a counts Dataset (specialization, chi-square, entropy,
  stickiness); ``mt.analysis``: seed 003's analyses; ``mt.figures``: every figure as a function
  returning a matplotlib Figure; ``mt.toy``: seed 001's toy model of superposition;
- ``mt.Targets(experts={layer: [expert]}, paths=..., pairs=..., boosts=...)`` and ``with
  mt.intervene(model, targets): ...`` (or ``mt.ablate(model, experts={...})``, ``mt.steer(model,
  layer, expert, logit=...)``): fused masked routing in every MoE layer;
- ``with mt.replay(model, "trace.zarr"): ...``: force a recorded trace's routes;
- ``mt.compare(a, b, by=[...])``: routing agreement of two traces of the same tokens.

The package is the folder ``engine/`` (orchestration; it never loops over rows in Python);
native code (Numba counters, Triton routing kernels) is ``moetrace.kernels``, the folder
``kernels/`` (see setup.py).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from moetrace.errors import MoetraceError

__version__ = "0.1.0"

# name -> (module, attribute); attribute None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "load_model": ("moetrace.models.loading", "load_model"),
    "capture": ("moetrace.capture", "capture"),
    "capture_texts": ("moetrace.capture", "capture_texts"),
    "TraceStore": ("moetrace.store", "TraceStore"),
    "open_store": ("moetrace.store", "open_store"),
    "count": ("moetrace.counting", "count"),
    "load_counts": ("moetrace.counting", "load_counts"),
    "save_counts": ("moetrace.counting", "save_counts"),
    "Targets": ("moetrace.targets", "Targets"),
    "intervene": ("moetrace.intervene", "intervene"),
    "ablate": ("moetrace.intervene", "ablate"),
    "steer": ("moetrace.intervene", "steer"),
    "replay": ("moetrace.replay", "replay"),
    "compare": ("moetrace.compare", "compare"),
    "metrics": ("moetrace.metrics", None),
    "analysis": ("moetrace.analysis", None),
    "figures": ("moetrace.figures", None),
    "toy": ("moetrace.toy", None),
    "demo": ("moetrace.demo", None),
}

__all__ = ["MoetraceError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """PEP 562: load ``name`` of :data:`_LAZY` on first use."""
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'moetrace' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# ``mt.capture``, ``mt.intervene``, ``mt.replay`` and ``mt.compare`` are functions named like the
# modules that define them. Importing such a module makes Python set the package attribute to the
# module; this keeps the function there instead (the module stays ``sys.modules["moetrace.capture"]``
# and every ``from moetrace.capture import ...`` works as usual).
_FUNCTIONS_NAMED_LIKE_THEIR_MODULE = frozenset(
    name for name, (module, attribute) in _LAZY.items() if module == f"moetrace.{name}" and attribute == name)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS_NAMED_LIKE_THEIR_MODULE and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
