"""Declarative parameters: a ``Params`` dataclass (a method's, a task's, the top-level config's)
declares each field's type (the annotation) and its bounds or choices (:func:`param`) once;
:func:`parse_params` and :func:`check_value` check given values against them in one place, with one
message format: the parameter, the value and what is allowed (``snapkv.kernel=4: expected an odd
integer >= 1``).

Lists (``list[int]``) must be non-empty and hold distinct elements (a repeated length or task would
repeat sample ids); the bounds and choices apply to every element, and a single value stands for a
one-element list (``task.lengths=512``). Numbers are finite."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from kvbench.errors import ConfigError
from kvbench.registry import unknown_name


def param(default: Any, *, ge: float | None = None, le: float | None = None,
          choices: tuple | None = None, odd: bool = False, **metadata: Any) -> Any:
    """A parameter field with its default and what values it allows: ``ge`` / ``le`` bounds,
    ``choices`` (an enumeration), ``odd`` (odd integers only). ``None`` is allowed where the field's
    type is optional. A list default is copied for every instance; further ``metadata`` is kept
    (``kvbench.tasks.base.location``)."""
    meta = {"ge": ge, "le": le, "choices": choices, "odd": odd, **metadata}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _kind(annotation) -> tuple[Any, bool]:
    """(type, optional) of a field annotation such as ``int``, ``int | None`` or ``list[int]``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


_NOUNS = {int: "an integer", float: "a number", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


def _bounds(meta: dict) -> str:
    ge, le = meta.get("ge"), meta.get("le")
    if ge is not None and le is not None:
        return f" in [{ge:g}, {le:g}]"
    if ge is not None:
        return f" >= {ge:g}"
    if le is not None:
        return f" <= {le:g}"
    return ""


def allowed(kind: Any, optional: bool, meta: dict) -> str:
    """What a field allows, in words: ``an integer >= 1``, ``one of 2, 4, 8, or null``."""
    if typing.get_origin(kind) is list:
        (element,) = typing.get_args(kind)
        if meta.get("choices"):
            text = "a non-empty list of distinct values, each " + allowed(element, False, meta)
        else:
            text = f"a non-empty list of distinct {_PLURALS[element]}{_bounds(meta)}"
    elif meta.get("choices"):
        text = "one of " + ", ".join(repr(c) if isinstance(c, str) else str(c) for c in meta["choices"])
    elif kind is bool:
        text = "true or false"
    else:
        text = ("an odd integer" if meta.get("odd") else _NOUNS[kind]) + _bounds(meta)
    return text + (", or null" if optional else "")


def _valid(value: Any, kind: Any, optional: bool, meta: dict) -> bool:
    if value is None:
        return optional
    if typing.get_origin(kind) is list:
        (element,) = typing.get_args(kind)
        return (isinstance(value, list) and len(value) > 0
                and all(_valid(v, element, False, meta) for v in value) and len(set(value)) == len(value))
    if kind is bool:
        return isinstance(value, bool)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # an int is a valid float (ratio-like values typed as 1); a float is never a valid int
    typed = {int: isinstance(value, int) and number, float: number, str: isinstance(value, str)}[kind]
    if not typed or (number and not math.isfinite(value)):
        return False
    if meta.get("choices") and value not in meta["choices"]:
        return False
    ge, le = meta.get("ge"), meta.get("le")
    if (ge is not None and not value >= ge) or (le is not None and not value <= le):
        return False
    return not meta.get("odd") or value % 2 == 1


def field_kinds(params_cls: type) -> dict[str, tuple[Any, bool, dict]]:
    """Every field of ``params_cls``: (type, optional, metadata), by name."""
    hints = typing.get_type_hints(params_cls)
    return {f.name: (*_kind(hints[f.name]), f.metadata) for f in dataclasses.fields(params_cls)}


def check_value(key: str, value: Any, kind: Any, optional: bool, meta: dict) -> Any:
    """``value`` if the field allows it (a single value given for a list field becomes a one-element
    list); otherwise a ConfigError ``key=value: expected ...``."""
    checked = [value] if typing.get_origin(kind) is list and isinstance(value, (str, int, float)) else value
    if not _valid(checked, kind, optional, meta):
        raise ConfigError(f"{key}={value!r}: expected {allowed(kind, optional, meta)}")
    return checked


def parse_params(owner: str, params_cls: type, values: dict[str, Any], noun: str = "parameter") -> Any:
    """``params_cls`` built from ``values``, each checked against its field's type and bounds.

    Errors name the owner (a method or task kind), the parameter, the value and what is allowed:
    ``snapkv.kernel=4: expected an odd integer >= 1``; an unknown parameter gets the valid ones
    (``unknown <owner> <noun> 'x'``)."""
    kinds = field_kinds(params_cls)
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise unknown_name(f"{owner} {noun}", unknown[0], kinds)
    checked = {name: check_value(f"{owner}.{name}", value, *kinds[name]) for name, value in values.items()}
    return params_cls(**checked)
