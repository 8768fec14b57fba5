"""The method catalog: every method's and update rule's Config, seen from the web process.

The single source stays each method's own module in ``adapters/``; importing those pulls
in torch and peft, which the web process never does. So the model process (jobs.engine.server,
task ``catalog``) writes the registries out as JSON (names, summaries, each Config's JSON
schema with types, defaults, bounds and help), and the web process rebuilds a pydantic
model per Config from that schema for its forms (``studio/ui/forms.py`` reads fields the
same way either way). Validation is never done with the rebuilt models: a spec is checked
by the real Configs and the methods' own ``check`` in the model process.

The JSON is cached in the studio home keyed by a code version (a hash of the source of
``adapters/`` and ``jobs/`` and the library versions) and the machine (its GPUs are listed
too), so a studio started again with the same code builds its forms without waiting for
torch to load.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from adapters.core.errors import StudioError
from jobs.runfolder import write_json_atomic

CODE_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("adapters", "jobs")
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "pydantic")


def code_version() -> str:
    """Changes whenever a method, the spec or a library the registries depend on changes."""
    h = hashlib.sha256()
    for package in SOURCES:
        for path in sorted((CODE_ROOT / package).rglob("*.py")):
            h.update(str(path.relative_to(CODE_ROOT)).encode())
            h.update(path.read_bytes())
    for lib in LIBRARIES:
        try:
            h.update(f"{lib}={metadata.version(lib)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{lib}=none".encode())
    return h.hexdigest()[:16]


def _machine_key() -> str:
    return f"{socket.gethostname()}|{os.environ.get('CUDA_VISIBLE_DEVICES', '')}"


@dataclass(frozen=True)
class Entry:
    """What the forms know about one method or update rule."""

    name: str
    summary: str
    Config: type[BaseModel]
    suggested_lr: float | None = None
    merge_blocker: str | None = None


class Table:
    """Name -> Entry, with the read side of ``adapters.registry.Registry``'s interface."""

    def __init__(self, kind: str, entries: list[Entry]):
        self.kind = kind
        self._items = {e.name: e for e in entries}

    def get(self, name: str, where: str | None = None) -> Entry:
        if name not in self._items:
            raise StudioError(f"unknown {self.kind} {name!r}.", where, f"use one of: {', '.join(self.names())}.")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, Entry]]:
        return sorted(self._items.items())

    def __contains__(self, name: Any) -> bool:
        return name in self._items


@dataclass(frozen=True)
class Catalog:
    methods: Table
    rules: Table
    devices: list[dict]

    @classmethod
    def from_json(cls, data: dict) -> "Catalog":
        def table(kind: str, items: list[dict]) -> Table:
            return Table(kind, [Entry(d["name"], d.get("summary") or "", model_from_schema(d["name"], d["schema"]),
                                      d.get("suggested_lr"), d.get("merge_blocker")) for d in items])
        return cls(table("method", data["methods"]), table("update rule", data["rules"]), data.get("devices") or [])


def load_catalog(home: Path, ask: Any) -> Catalog:
    """The catalog from the home's cache, or from ``ask("catalog")`` (the model process) once."""
    path = home / "cache" / f"catalog-{code_version()}.json"
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("machine") == _machine_key():
            return Catalog.from_json(cached["catalog"])
    except (OSError, ValueError, KeyError):
        pass  # absent or damaged: ask again
    data = ask("catalog")
    for old in path.parent.glob("catalog-*.json"):
        old.unlink(missing_ok=True)  # other code versions' catalogs are never read again
    write_json_atomic(path, {"machine": _machine_key(), "catalog": data})
    return Catalog.from_json(data)


# -- JSON schema -> a pydantic model with the same fields (for the forms) --------------------

_SCALARS = {"integer": int, "number": float, "boolean": bool, "string": str}
_BOUNDS = {"minimum": "ge", "maximum": "le", "exclusiveMinimum": "gt", "exclusiveMaximum": "lt"}


def model_from_schema(name: str, schema: dict) -> type[BaseModel]:
    defs = schema.get("$defs", {})
    fields = {}
    for field, prop in (schema.get("properties") or {}).items():
        prop = _deref(prop, defs)
        kwargs: dict[str, Any] = {"description": prop.get("description")}
        for key, arg in _BOUNDS.items():
            bound = _bound(prop, key, defs)
            if bound is not None:
                kwargs[arg] = bound
        default = prop.get("default", ...)
        fields[field] = (_annotation(prop, defs), Field(default, **kwargs))
    return create_model(f"{name}_form", __config__=ConfigDict(extra="forbid"), **fields)


def _deref(prop: dict, defs: dict) -> dict:
    if "$ref" in prop:
        target = defs.get(prop["$ref"].rsplit("/", 1)[-1], {})
        return {**target, **{k: v for k, v in prop.items() if k != "$ref"}}
    return prop


def _bound(prop: dict, key: str, defs: dict):
    if key in prop:
        return prop[key]
    for option in prop.get("anyOf", []):  # Optional[int] with a bound keeps it on the int
        option = _deref(option, defs)
        if key in option:
            return option[key]
    return None


def _annotation(prop: dict, defs: dict) -> Any:
    prop = _deref(prop, defs)
    if "enum" in prop:
        return Literal[tuple(prop["enum"])]
    if "const" in prop:
        return Literal[prop["const"]]
    if "anyOf" in prop:
        options = [_annotation(o, defs) for o in prop["anyOf"]]
        return Union[tuple(options)] if len(options) > 1 else options[0]
    kind = prop.get("type")
    if kind == "null":
        return type(None)
    if kind == "array":
        items = prop.get("items") or {}
        inner = _annotation(items, defs) if items else Any
        return list[str] if inner is not Any and _is_text_choice(inner) else list[inner]
    if kind in _SCALARS:
        return _SCALARS[kind]
    return Optional[Any]


def _is_text_choice(annotation: Any) -> bool:
    # A list of Literal strings shows as a comma-separated text box, like list[str].
    import typing

    return typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in typing.get_args(annotation))
