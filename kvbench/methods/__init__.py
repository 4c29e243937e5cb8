"""Method registry: every module in this package that defines a ``Method`` subclass with a
``name`` registers it through :func:`register`; :func:`store_configs` turns each into the Hydra
config ``method/<name>``."""

from __future__ import annotations

import dataclasses
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
    """A method object for one run: its parameters checked, its compression-dependent choices made.
    Call :meth:`Method.setup` with the model before building caches."""
    cls = method_class(name)
    return cls(cls.parse_params(params), compression if cls.uses_compression else None, seed)


def store_configs(config_store) -> None:
    """Register ``method=<name>`` for every method in Hydra's ConfigStore: ``name`` plus every
    parameter at its default, generated from the classes so no default is written twice."""
    for name, cls in registered().items():
        config_store.store(group="method", name=name, node={"name": name, **dataclasses.asdict(cls.Params())})


__all__ = ["Compression", "ConfigError", "KVLayer", "Method", "build_method", "method_class", "register",
           "registered", "store_configs"]
