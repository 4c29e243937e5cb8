"""Method registry: every module in this package that defines a ``Method`` subclass with a
``name`` registers it through :func:`register`. Methods are built fresh for every run."""

from __future__ import annotations

from typing import Any

from kvbench.errors import ConfigError
from kvbench.methods.base import Compression, KVLayer, Method
from kvbench.registry import Registry

METHODS: Registry[type[Method]] = Registry("method", __name__, lambda cls: cls.name)
#: class decorator: make ``cls`` selectable as ``method=<cls.name>``
register = METHODS.register


def registered() -> dict[str, type[Method]]:
    return METHODS.all()


def method_class(name: str) -> type[Method]:
    return METHODS.get(name)


def build_method(name: str, params: dict[str, Any], compression: Compression | None, seed: int = 0) -> Method:
    """A fresh method object for one run (never shared between runs: methods hold state)."""
    cls = method_class(name)
    return cls(cls.parse_params(params), compression if cls.uses_compression else None, seed)


__all__ = ["Compression", "ConfigError", "KVLayer", "Method", "build_method", "method_class", "register", "registered"]
