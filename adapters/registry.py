"""Name -> implementation tables for fine-tuning methods and update rules.

A method or update rule registers itself from its own module (``register(obj)`` at
import time); ``adapters/__init__.py`` imports every module once so the tables are
full. Adding a method is adding one module and one import line.
"""
from __future__ import annotations

from typing import Any, Generic, TypeVar

from jobs.errors import StudioError

T = TypeVar("T")


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
        try:
            return self._items[name]
        except KeyError:
            raise StudioError(
                f"unknown {self.kind} {name!r}.",
                where,
                f"use one of: {', '.join(sorted(self._items))}.",
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: Any) -> bool:
        return name in self._items

    def items(self):
        return sorted(self._items.items())


METHODS: Registry = Registry("method")
UPDATE_RULES: Registry = Registry("update rule")
