"""Declarative method parameters: a method's ``Params`` is a dataclass whose fields declare their
type (the annotation) and their bounds or choices (:func:`param`) once; :func:`parse_params` checks
every given value against them in one place, with one message format."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from kvbench.errors import ConfigError
from kvbench.registry import unknown_name


def param(default: Any, *, ge: float | None = None, le: float | None = None,
          choices: tuple | None = None, odd: bool = False) -> Any:
    """A parameter field with its default and what values it allows: ``ge`` / ``le`` bounds,
    ``choices`` (an enumeration), ``odd`` (odd integers only). ``None`` is allowed where the field's
    type is optional."""
    return dataclasses.field(default=default, metadata={"ge": ge, "le": le, "choices": choices, "odd": odd})


def _kind(annotation) -> tuple[type, bool]:
    """(base type, optional) of a field annotation such as ``int`` or ``int | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


_NOUNS = {int: "an integer", float: "a number", str: "a string"}


def allowed(kind: type, optional: bool, meta: dict) -> str:
    """What a field allows, in words: ``an integer >= 1``, ``one of 2, 4, 8, or null``."""
    if meta.get("choices"):
        text = "one of " + ", ".join(repr(c) if isinstance(c, str) else str(c) for c in meta["choices"])
    elif kind is bool:
        text = "true or false"
    else:
        text = "an odd integer" if meta.get("odd") else _NOUNS[kind]
        ge, le = meta.get("ge"), meta.get("le")
        if ge is not None and le is not None:
            text += f" in [{ge:g}, {le:g}]"
        elif ge is not None:
            text += f" >= {ge:g}"
        elif le is not None:
            text += f" <= {le:g}"
    return text + (", or null" if optional else "")


def _valid(value: Any, kind: type, optional: bool, meta: dict) -> bool:
    if value is None:
        return optional
    if kind is bool:
        return isinstance(value, bool)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # an int is a valid float (ratio-like values typed as 1); a float is never a valid int
    typed = {int: isinstance(value, int) and number, float: number, str: isinstance(value, str)}[kind]
    if not typed:
        return False
    if meta.get("choices") and value not in meta["choices"]:
        return False
    ge, le = meta.get("ge"), meta.get("le")
    if (ge is not None and not value >= ge) or (le is not None and not value <= le):
        return False
    return not meta.get("odd") or value % 2 == 1


def parse_params(method: str, params_cls: type, values: dict[str, Any]) -> Any:
    """``params_cls`` built from ``values``, each checked against its field's type and bounds.

    Errors name the method, the parameter, the value and what is allowed:
    ``snapkv.kernel=4: expected an odd integer >= 1``."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise unknown_name(f"{method} parameter", unknown[0], fields)
    hints = typing.get_type_hints(params_cls)
    for name, value in values.items():
        kind, optional = _kind(hints[name])
        meta = fields[name].metadata
        if not _valid(value, kind, optional, meta):
            raise ConfigError(f"{method}.{name}={value!r}: expected {allowed(kind, optional, meta)}")
    return params_cls(**values)
