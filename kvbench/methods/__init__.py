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


#: the markers around the capacity table in the docs (:func:`write_capacity_tables`)
CAPACITY_TABLE_BEGIN = "<!-- capacity table: generated from the methods by `python -m kvbench.methods`; do not edit -->"
CAPACITY_TABLE_END = "<!-- end of the capacity table -->"


def capacity_table() -> str:
    """The markdown table of what ``budget=`` bounds for every registered method, generated from the
    classes' declarations (``budget_unit``, ``budget_bounds``, ``budget_refusal``)."""
    from kvbench.report import markdown_table  # report is heavy (pandas, plots); only the docs need it

    rows = []
    for name, cls in sorted(registered().items()):
        if not cls.uses_compression:
            rows.append([f"`{name}`", "-", "no compression", "no compression"])
        elif cls.budget_refusal:
            rows.append([f"`{name}`", "-", f"no budget: {cls.budget_refusal}", "-"])
        else:
            rows.append([f"`{name}`", cls.budget_unit, *cls.budget_bounds()])
    return markdown_table(["method", "budget counts (per layer and KV head)", "held after a prefill step",
                           "held after a decoding step"], rows)


def write_capacity_tables(paths) -> list:
    """Replace the capacity table between the markers of every file in ``paths`` by the generated
    one; returns the files that changed."""
    changed = []
    for path in paths:
        text = path.read_text()
        head, _, rest = text.partition(CAPACITY_TABLE_BEGIN)
        _, _, tail = rest.partition(CAPACITY_TABLE_END)
        new = f"{head}{CAPACITY_TABLE_BEGIN}\n{capacity_table()}\n{CAPACITY_TABLE_END}{tail}"
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def store_configs(config_store) -> None:
    """Register ``method=<name>`` for every method in Hydra's ConfigStore: ``name`` plus every
    parameter at its default, generated from the classes so no default is written twice."""
    for name, cls in registered().items():
        config_store.store(group="method", name=name, node={"name": name, **dataclasses.asdict(cls.Params())})


__all__ = ["Compression", "ConfigError", "KVLayer", "Method", "build_method", "capacity_table", "method_class",
           "register", "registered", "store_configs", "write_capacity_tables"]
