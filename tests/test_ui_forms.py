"""Widgets generated from pydantic Configs: every registered method and update rule gets a
form whose values, read back unchanged, validate to the Config's own defaults."""
from __future__ import annotations

from typing import Literal

import gradio as gr
import pytest
from pydantic import Field

from adapters import METHODS, UPDATE_RULES
from adapters.base import Params
from adapters.core.errors import StudioError
from jobs.spec import TrainingSpec
from studio.ui.forms import build_form, classify


class Sample(Params):
    rank: int = Field(8, ge=1, le=64, description="Rank.")
    scale: float = Field(0.5, gt=0, description="Scale.")
    steps: int | None = Field(None, ge=1, description="Optional steps.")
    mode: Literal["a", "b"] = Field("a", description="Mode.")
    flag: bool = Field(False, description="Flag.")
    name: str = Field("x", description="Name.")
    targets: str | list[str] = Field("all-linear", description="Targets.")
    layers: list[str] = Field(default_factory=lambda: ["q", "v"], description="Layers.")


def render(model, **kwargs):
    with gr.Blocks():
        return build_form(model, "method.", elem_prefix="train.method.sample", **kwargs)


def test_widget_kinds_ids_and_help_follow_the_field_types():
    form = render(Sample)
    kinds = {n: type(w.component).__name__ for n, w in form.widgets.items()}
    assert kinds == {"rank": "Number", "scale": "Number", "steps": "Number", "mode": "Dropdown", "flag": "Checkbox",
                     "name": "Textbox", "targets": "Textbox", "layers": "Textbox"}
    rank = form.widgets["rank"].component
    assert rank.elem_id == "train.method.sample.rank" and rank.precision == 0
    assert rank.info == "Rank. (>= 1, <= 64)"
    assert form.widgets["mode"].component.choices == [("a", "a"), ("b", "b")]
    assert classify(int | None) == ("int", (type(None),))


def test_values_read_back_validate_and_errors_name_the_field():
    form = render(Sample)
    values = {w.component: w.component.value for w in form.widgets.values()}
    assert Sample(**form.read(values)) == Sample()
    c = {n: w.component for n, w in form.widgets.items()}
    edited = {**values, c["rank"]: 16.0, c["steps"]: None, c["targets"]: "q_proj, v_proj", c["layers"]: "k",
              c["scale"]: 2}
    data = form.read(edited)
    assert data["rank"] == 16 and isinstance(data["rank"], int) and data["steps"] is None
    assert data["targets"] == ["q_proj", "v_proj"] and data["layers"] == ["k"]
    assert form.read({**values, c["targets"]: "all-linear"})["targets"] == "all-linear"
    with pytest.raises(StudioError, match=r"method\.rank.*whole number"):
        form.read({**edited, c["rank"]: 2.5})
    assert form.show({"rank": 4, "targets": ["a", "b"]}) == {c["rank"]: 4, c["targets"]: "a, b"}


@pytest.mark.parametrize("registry", [METHODS, UPDATE_RULES], ids=["methods", "update_rules"])
@pytest.mark.slow
def test_every_registered_config_round_trips(registry):
    for name, item in registry.items():
        form = render(item.Config)
        values = {w.component: w.component.value for w in form.widgets.values()}
        assert item.Config(**form.read(values)) == item.Config(), name


def test_columns_and_subsets_of_a_section():
    form = render(TrainingSpec, include=("max_steps", "batch_size"), columns=4)
    assert list(form.widgets) == ["max_steps", "batch_size"]
    rest = render(TrainingSpec, exclude=("max_steps", "batch_size"), defaults={"epochs": 3.0})
    assert "max_steps" not in rest.widgets and rest.widgets["epochs"].component.value == 3.0
