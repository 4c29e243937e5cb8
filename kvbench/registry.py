"""One registry for everything selectable by name (methods, task kinds): unknown names are refused
with the valid choices and the closest ones ("did you mean")."""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Callable, Generic, Iterable, TypeVar

from kvbench.errors import ConfigError

T = TypeVar("T")


def unknown_name(kind: str, name: object, choices: Iterable[str]) -> ConfigError:
    """The error for a name that is not one of ``choices``: the choices, and the closest ones."""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(name), choices, n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return ConfigError(f"unknown {kind} {name!r}{hint}; valid: {', '.join(choices) or 'none'}")


class Registry(Generic[T]):
    """Classes registered by a key attribute, loaded from every module of ``package`` on first use.

    ``kind`` names what is registered in error messages (``"method"``, ``"task kind"``)."""

    def __init__(self, kind: str, package: str, key: Callable[[T], str]):
        self.kind, self.package, self.key = kind, package, key
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, cls: T) -> T:
        """Class decorator: make ``cls`` selectable by its key."""
        name = self.key(cls)
        if name in self._entries and self._entries[name] is not cls:
            raise ValueError(f"{self.kind} name '{name}' registered twice")
        self._entries[name] = cls
        return cls

    def _load(self) -> None:
        if self._loaded:
            return
        module = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(module.__path__):
            if info.name != "base":
                importlib.import_module(f"{self.package}.{info.name}")
        self._loaded = True

    def all(self) -> dict[str, T]:
        self._load()
        return dict(sorted(self._entries.items()))

    def get(self, name: object) -> T:
        entries = self.all()
        if not isinstance(name, str) or name not in entries:
            raise unknown_name(self.kind, name, entries)
        return entries[name]
