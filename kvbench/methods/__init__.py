"""Method registry: every module in this package that defines a ``Method`` subclass with a
``name`` registers it through :func:`register`. Methods are built fresh for every run."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from kvbench.methods.base import Compression, ConfigError, KVLayer, Method

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` selectable as ``method=<cls.name>``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def registered() -> dict[str, type[Method]]:
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def method_class(name: str) -> type[Method]:
    methods = registered()
    if name not in methods:
        raise ConfigError(f"unknown method '{name}'; registered methods: {', '.join(methods)}")
    return methods[name]


def build_method(name: str, params: dict[str, Any], compression: Compression | None, seed: int = 0) -> Method:
    """A fresh method object for one run (never shared between runs: methods hold state)."""
    cls = method_class(name)
    return cls(cls.parse_params(params), compression if cls.uses_compression else None, seed)


__all__ = ["Compression", "ConfigError", "KVLayer", "Method", "build_method", "method_class", "register", "registered"]
