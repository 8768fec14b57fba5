"""Name -> implementation tables for fine-tuning methods and update rules.

A method or update rule registers itself from its own module (``register(obj)`` at
import time). The first lookup in either table imports every module of ``adapters`` once,
so the tables are full without an import list, and importing ``adapters`` itself (as the
torch-free web process does for ``adapters.core``) loads no method.
"""
from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Any, Generic, TypeVar

from adapters.core.errors import StudioError

T = TypeVar("T")

# Modules that register nothing: the tables themselves, the contracts, the bottom package.
_INFRASTRUCTURE = {"registry", "base", "core"}
_lock = threading.RLock()
_populated = False


def _import_all() -> None:
    """Import every method and update-rule module once (thread-safe: two handler threads of a
    model process may look up a method at the same moment)."""
    global _populated
    with _lock:
        if _populated:
            return
        _populated = True  # set first: a module that looks something up while importing must not recurse
        import adapters

        try:
            for info in pkgutil.walk_packages(adapters.__path__, prefix="adapters."):
                parts = info.name.split(".")[1:]
                if any(p.startswith("_") or p in _INFRASTRUCTURE for p in parts):
                    continue
                importlib.import_module(info.name)
        except BaseException:
            _populated = False  # the next lookup raises the same import error instead of a half table
            raise


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, item: T) -> T:
        name = getattr(item, "name")
        if name in self._items:
            raise RuntimeError(f"{self.kind} {name!r} registered twice")
        self._items[name] = item
        return item

    def get(self, name: str, where: str | None = None) -> T:
        _import_all()
        try:
            return self._items[name]
        except KeyError:
            raise StudioError(
                f"unknown {self.kind} {name!r}.",
                where,
                f"use one of: {', '.join(sorted(self._items))}.",
            ) from None

    def names(self) -> list[str]:
        _import_all()
        return sorted(self._items)

    def __contains__(self, name: Any) -> bool:
        _import_all()
        return name in self._items

    def items(self):
        _import_all()
        return sorted(self._items.items())


METHODS: Registry = Registry("method")
UPDATE_RULES: Registry = Registry("update rule")
