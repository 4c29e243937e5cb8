"""Task registry: task kinds (``kind:`` in ``conf/task/*.yaml``) registered by their modules."""

from __future__ import annotations

from typing import Any

from kvbench.errors import ConfigError
from kvbench.registry import Registry
from kvbench.tasks.base import Sample, Task, TaskGroup

TASKS: Registry[type[Task]] = Registry("task kind", __name__, lambda cls: cls.kind)
register = TASKS.register


def registered() -> dict[str, type[Task]]:
    return TASKS.all()


def build_task(values: dict[str, Any]) -> Task:
    """A task from its config mapping: ``name`` (results name), ``kind`` (registry key), parameters."""
    values = dict(values)
    name, kind = values.pop("name", None), values.pop("kind", None)
    cls = TASKS.get(kind)
    if not name:
        raise ConfigError("task config needs a 'name' (the results directory name)")
    return cls(name, cls.parse_params(values))


def task_from_identity(description: dict[str, Any]) -> Task:
    """The task a run.json identity describes (``Task.describe()``), not validated again."""
    return TASKS.get(description["kind"]).from_identity(description)


__all__ = ["Sample", "Task", "TaskGroup", "build_task", "register", "registered", "task_from_identity"]
