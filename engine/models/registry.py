"""The one registry of router adapters, keyed on the transformers router class name."""

from __future__ import annotations

import re

from torch import nn

from moetrace.errors import MoetraceError
from moetrace.models.base import RouterAdapter

_ADAPTERS: dict[str, type[RouterAdapter]] = {}
_ROUTER_NAME_RE = re.compile(r"Top[Kk]Router$")


def register(cls: type[RouterAdapter]) -> type[RouterAdapter]:
    """Class decorator: register ``cls`` for each class name in ``cls.router_classes``."""
    if not cls.family or not cls.router_classes:
        raise TypeError(f"{cls.__name__}: an adapter needs a family and router_classes")
    for name in cls.router_classes:
        if name in _ADAPTERS:
            raise TypeError(f"router class {name} registered twice ({_ADAPTERS[name].__name__}, {cls.__name__})")
        _ADAPTERS[name] = cls
    return cls


def supported_families() -> list[str]:
    """Sorted names of the families an adapter covers."""
    return sorted({cls.family for cls in _ADAPTERS.values()})


def supported_router_classes() -> dict[str, str]:
    """Router class name -> family name, for every registered adapter."""
    return {name: cls.family for name, cls in sorted(_ADAPTERS.items())}


def adapter_for(model: nn.Module) -> RouterAdapter:
    """The adapter for ``model``'s router modules.

    Raises MoetraceError (listing the supported families) when the model has no router
    module of a supported family, when it has a ``*TopKRouter`` module no adapter covers,
    or when it mixes routers of several families.
    """
    known, unknown = set(), set()
    for module in model.modules():
        name = type(module).__name__
        if name in _ADAPTERS:
            known.add(name)
        elif _ROUTER_NAME_RE.search(name):
            unknown.add(name)
    families = ", ".join(supported_families())
    if unknown:
        raise MoetraceError(
            f"model {type(model).__name__}: router class(es) {sorted(unknown)} not supported; "
            f"expected a model of one of these families: {families}"
        )
    adapters = {_ADAPTERS[name] for name in known}
    if not adapters:
        raise MoetraceError(
            f"model {type(model).__name__}: expected a Mixture-of-Experts model with router modules of one "
            f"of these families: {families}; got no router module"
        )
    if len(adapters) > 1:
        raise MoetraceError(
            f"model {type(model).__name__}: expected routers of one family, got {sorted(known)}"
        )
    return adapters.pop()()
