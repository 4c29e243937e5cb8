"""Task registry: task kinds (``kind:`` in ``conf/task/*.yaml``) registered by their modules."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from kvbench.methods.base import ConfigError
from kvbench.tasks.base import Sample, Task

_REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise ValueError(f"task kind '{cls.kind}' registered twice")
    _REGISTRY[cls.kind] = cls
    return cls


def registered() -> dict[str, type[Task]]:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    return dict(sorted(_REGISTRY.items()))


def build_task(values: dict[str, Any]) -> Task:
    """A task from its config mapping: ``name`` (results name), ``kind`` (registry key), parameters."""
    values = dict(values)
    name, kind = values.pop("name", None), values.pop("kind", None)
    kinds = registered()
    if kind not in kinds:
        raise ConfigError(f"unknown task kind '{kind}'; registered kinds: {', '.join(kinds)}")
    if not name:
        raise ConfigError("task config needs a 'name' (the results directory name)")
    cls = kinds[kind]
    return cls(name, cls.parse_params(values))


__all__ = ["Sample", "Task", "build_task", "register", "registered"]
