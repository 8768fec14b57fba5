"""Widgets generated from a pydantic Config, and the values read back from them.

A method, an update rule or a spec section describes its own fields (type, default,
description, bounds); this module turns each field into one Gradio widget and turns
the widgets' values back into a dict the Config validates. The widget kind follows the
field type only, so a new method with new fields needs no UI code.
"""
from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import gradio as gr
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from adapters.core.errors import StudioError


@dataclass
class Widget:
    name: str
    component: gr.components.Component
    read: Callable[[Any], Any]  # widget value -> field value
    show: Callable[[Any], Any]  # field value -> widget value


@dataclass
class Form:
    """The widgets of one Config, in field order, keyed by field name."""

    model: type[BaseModel]
    prefix: str
    widgets: dict[str, Widget] = field(default_factory=dict)

    @property
    def components(self) -> list[gr.components.Component]:
        return [w.component for w in self.widgets.values()]

    def read(self, values: dict) -> dict:
        """Field values from ``{component: widget value}`` (an event's input dict)."""
        out = {}
        for name, w in self.widgets.items():
            try:
                out[name] = w.read(values[w.component])
            except (ValueError, TypeError, yaml.YAMLError) as e:
                raise StudioError(f"cannot read the value {values[w.component]!r} ({e}).", f"{self.prefix}{name}",
                                  f"enter a value of type {describe_type(self.model.model_fields[name].annotation)}.")
        return out

    def show(self, data: dict) -> dict:
        """Widget updates that display ``data`` (fields it lacks keep their widget)."""
        return {w.component: w.show(data[name]) for name, w in self.widgets.items() if name in data}


def build_form(model: type[BaseModel], prefix: str, *, elem_prefix: str, exclude: tuple[str, ...] = (),
               include: tuple[str, ...] | None = None, defaults: dict | None = None, columns: int = 3) -> Form:
    """Render one widget per field of ``model`` in the current Blocks context, ``columns`` to a row.

    ``prefix`` names fields in error messages ("method."), ``elem_prefix`` scopes the DOM
    ids ("train.method.lora" gives ``train.method.lora.r``).
    """
    form = Form(model, prefix)
    names = [n for n in model.model_fields if n not in exclude and (include is None or n in include)]
    for start in range(0, len(names), columns):
        with gr.Row(equal_height=False):
            for name in names[start:start + columns]:
                info = model.model_fields[name]
                default = (defaults or {}).get(name, info.get_default(call_default_factory=True))
                form.widgets[name] = widget_for(name, info, default, f"{elem_prefix}.{name}")
    return form


def widget_for(name: str, info: FieldInfo, default: Any, elem_id: str) -> Widget:
    kind, args = classify(info.annotation)
    help_text = (info.description or "") + bounds_text(info)
    common = {"label": name, "info": help_text or None, "elem_id": elem_id, "min_width": 180}
    if kind == "bool":
        return Widget(name, gr.Checkbox(value=bool(default), **common), bool, bool)
    if kind == "choice":
        choices = [c for c in args]
        comp = gr.Dropdown(choices=choices, value=default, **common)
        return Widget(name, comp, lambda v: v, lambda v: v)
    if kind in ("int", "float"):
        optional = type(None) in args
        precision = 0 if kind == "int" else None
        comp = gr.Number(value=default, precision=precision, **common)
        return Widget(name, comp, _number_reader(kind, optional), lambda v: v)
    if kind == "str":
        return Widget(name, gr.Textbox(value=default or "", max_lines=1, **common),
                      _text_reader(type(None) in args), lambda v: "" if v is None else v)
    if kind in ("list", "str_or_list"):
        shown = default if isinstance(default, str) else ", ".join(map(str, default or []))
        comp = gr.Textbox(value=shown, max_lines=1, **{**common, "info": (help_text + " Comma-separated.").strip()})
        return Widget(name, comp, _list_reader(kind == "str_or_list", type(None) in args),
                      lambda v: v if isinstance(v, str) else ", ".join(map(str, v or [])))
    comp = gr.Code(value=json.dumps(default, indent=1), language="json", label=name, elem_id=elem_id)
    return Widget(name, comp, lambda v: yaml.safe_load(v) if (v or "").strip() else None,
                  lambda v: json.dumps(v, indent=1))


def classify(annotation: Any) -> tuple[str, tuple]:
    """A field type as one of: bool, choice, int, float, str, list, str_or_list, other."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "choice", typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:
            kind, inner = classify(real[0])
            return kind, inner + ((type(None),) if len(args) > len(real) else ())
        if str in real and any(typing.get_origin(a) is list for a in real):
            return "str_or_list", ()
        if set(real) <= {int, float}:
            return "float", tuple(a for a in args if a is type(None))
        return "other", ()
    if origin is list:
        return "list", ()
    if annotation is bool:
        return "bool", ()
    if annotation is int:
        return "int", ()
    if annotation is float:
        return "float", ()
    if annotation is str:
        return "str", ()
    return "other", ()


def describe_type(annotation: Any) -> str:
    kind, args = classify(annotation)
    return {"choice": "one of " + ", ".join(map(str, args)), "str_or_list": "text or a comma-separated list",
            "list": "a comma-separated list", "other": "JSON"}.get(kind, kind)


def bounds_text(info: FieldInfo) -> str:
    marks = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = []
    for meta in info.metadata:
        for attr, sign in marks.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:g}" if isinstance(value, (int, float)) else f"{sign} {value}")
    return f" ({', '.join(parts)})" if parts else ""


def _number_reader(kind: str, optional: bool) -> Callable[[Any], Any]:
    def read(value):
        if value is None or (isinstance(value, str) and not value.strip()):
            if optional:
                return None
            raise ValueError("a number is required")
        number = float(value)
        if kind == "int":
            if number != int(number):
                raise ValueError("a whole number is required")
            return int(number)
        return number
    return read


def _text_reader(optional: bool) -> Callable[[Any], Any]:
    def read(value):
        text = (value or "").strip()
        return None if optional and not text else text
    return read


def _list_reader(allow_single_text: bool, optional: bool) -> Callable[[Any], Any]:
    def read(value):
        if isinstance(value, list):
            return value
        text = (value or "").strip()
        if optional and not text:
            return None
        if text.startswith("["):
            return yaml.safe_load(text)
        items = [part.strip() for part in text.split(",") if part.strip()]
        if allow_single_text and len(items) == 1 and "," not in text:
            return items[0]
        return items
    return read
