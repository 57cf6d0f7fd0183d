"""A small generic registry: decorator registration, lazy "module:attr" placeholders, entry points, did-you-mean.

Lookups import the providing module only when a name is asked for, so listing editors or probes stays cheap.
"""
from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the allowed names and close matches."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain sentence
        return str(self.args[0])


def did_you_mean(name: str, allowed: Iterable[str]) -> str:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"allowed: {', '.join(allowed) or '(none)'}.{hint}"


def normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


class Registry(Generic[T]):
    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._objects: dict[str, T] = {}
        self._lazy: dict[str, str] = {}  # name -> "module:attr"
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        key = normalise(name)

        def deco(obj: T) -> T:
            existing = self._objects.get(key)
            if existing is not None and existing is not obj:
                # Same qualified name means a module re-import (e.g. importlib reload); anything else is a clash.
                same = getattr(existing, "__qualname__", None) == getattr(obj, "__qualname__", None) and getattr(
                    existing, "__module__", None
                ) == getattr(obj, "__module__", None)
                if not same:
                    raise ValueError(f"{self.kind} {key!r} registered twice: {existing!r} and {obj!r}")
            self._objects[key] = obj
            return obj

        return deco

    def register_lazy(self, name: str, target: str) -> None:
        """Register `name` as "module:attr", imported on first lookup."""
        self._lazy.setdefault(normalise(name), target)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or not self.entry_point_group:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            self._lazy.setdefault(normalise(ep.name), ep.value)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(set(self._objects) | set(self._lazy))

    def get(self, name: str) -> T:
        key = normalise(name)
        if key not in self._objects:
            self._load_entry_points()
            target = self._lazy.get(key)
            if target is None:
                raise UnknownNameError(f"unknown {self.kind} {name!r}; {did_you_mean(key, self.names())}")
            module_name, _, attr = target.partition(":")
            module = importlib.import_module(module_name)
            if key not in self._objects:  # the module did not self-register under this name
                if not attr:
                    raise ValueError(f"{self.kind} {key!r}: module {module_name!r} did not register it")
                self._objects[key] = getattr(module, attr)
        return self._objects[key]
