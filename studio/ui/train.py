"""The Train tab: base model, dataset, method, update rule and training settings, a live
memory estimate with a verdict for the chosen device, and launch into the job queue.

Every method's and update rule's fields come from its registered Config (see forms.py), as
the method catalog describes it (studio/catalog.py: the web process imports no method):
one hidden group of widgets per registry entry, the chosen one shown. Checking and
estimating a spec run in the model process (studio/engine.py).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import gradio as gr

from jobs.confine import check_devices
from adapters.core.errors import StudioError
from jobs.spec import DatasetSpec, TrainingSpec
from studio.estimates import EstimateCache
from studio.ui.common import (Studio, describe_failure, fmt_bytes, for_api, job_summary, message_html, want_dict,
                              want_int, want_text)
from studio.ui.forms import Form, build_form

DEMO_SPEC = Path(__file__).resolve().parents[2] / "assets" / "specs" / "demo_lora.yaml"
# Shown at once; the rest of TrainingSpec sits under "More training settings".
MAIN_TRAINING = ("max_steps", "epochs", "batch_size", "grad_accum", "max_seq_len", "lr_schedule", "warmup_steps",
                 "eval_every", "devices", "sharding")
FITS, TIGHT = 0.8, 1.0  # share of the device's memory: below FITS fits, up to TIGHT is tight
PLACEHOLDER_DIR = "<home>/runs/<id>"
PHASES = {"load": "loading the model", "apply": "applying the method", "train": "training",
          "save": "gathering the sharded model to save it"}
NAME_LIMIT, PRIORITY_LIMIT = 80, 1000


# -- the work, shared by the page and the API ------------------------------------------------

def starting_values() -> dict:
    """The demo spec's choices, so the form launches a sensible run as it stands."""
    from jobs.spec import read_spec_file

    try:
        data = read_spec_file(DEMO_SPEC) if DEMO_SPEC.is_file() else {}
    except StudioError:
        data = {}
    return data if isinstance(data, dict) else {}


def resolve_dataset(studio: Studio, data: dict) -> dict:
    """A spec may name a stored dataset (id or name) instead of a file path."""
    data = dict(want_dict(data or {}, "spec"))
    ds = data.get("dataset")
    ds = dict(ds) if isinstance(ds, dict) else {}
    ref = ds.get("path")
    if isinstance(ref, str) and ref:
        try:  # a stored name first: what a path names is checked against the policy later
            entry = studio.datasets.get(ref)
        except StudioError:
            return data  # a path: validation checks where it points, and reports a missing file
        ds["path"] = entry.file
        if entry.eval_file and "eval_path" not in ds:
            ds["eval_path"] = entry.eval_file
        data["dataset"] = ds
    return data


def device_choices(studio: Studio) -> list[tuple[str, str]]:
    import psutil

    out = [(f"GPU {d['id'].partition(':')[2]}: {d['name']} ({fmt_bytes(d['total_memory'])})", d["id"])
           for d in studio.catalog.devices]
    out.append((f"CPU ({fmt_bytes(psutil.virtual_memory().available)} RAM available)", "cpu"))
    return out


def device_capacity(studio: Studio, device: str) -> tuple[str, int, str]:
    """What the estimate is compared with (a GPU's total memory, or the RAM available now), and the device.

    The GPUs come from the catalog (the model process lists them): the web process has no torch."""
    import psutil

    gpus = {d["id"]: d for d in studio.catalog.devices}
    if device in ("", "auto"):
        device = "cuda:0" if gpus else "cpu"
    if device.startswith("cuda"):
        index = device.partition(":")[2] or "0"
        if f"cuda:{index}" not in gpus:
            raise StudioError(f"there is no GPU {index} on this machine.", "device", "choose cpu or an existing GPU.")
        gpu = gpus[f"cuda:{index}"]
        return f"GPU {index} ({gpu['name']})", int(gpu["total_memory"]), gpu["id"]
    if device != "cpu":
        raise StudioError(f"unknown device {device!r}.", "device", "use cpu, cuda:N or auto.")
    return "CPU RAM available", int(psutil.virtual_memory().available), "cpu"


def check(studio: Studio, data: dict, device: str = "auto") -> dict:
    """Validate a spec as launch would, then estimate its memory against ``device``.

    Both run in the model process (studio.engine); a spec seen before, with the same files
    and code, is answered from the home's cache (studio/estimates.py) without asking it."""
    data = resolve_dataset(studio, data)
    device = want_text(device, "device", 16) or "auto"
    given_dir = bool(data.get("output_dir"))
    data = {**data, "output_dir": data.get("output_dir") or PLACEHOLDER_DIR}
    resolved = studio.ask("validate", data=data, where="spec")
    check_devices(resolved["training"]["devices"], "spec: training.devices")
    # What the estimate loads is confined like what a launch would train on.
    resolved = studio.policy.check_spec(resolved, output_dir_given=given_dir)
    where, capacity, device = device_capacity(studio, device)
    result = estimate_for(studio, resolved, device)
    out: dict[str, Any] = {"valid": True, "device": where, "device_bytes": capacity}
    if not result.get("available"):
        return {**out, "available": False, "reason": result.get("reason")}
    total = int(result["total_bytes"])  # one rank's peak
    # Per device: a GPU holds one rank; a CPU's RAM holds every rank this machine runs.
    held = int(result.get("node_bytes", total)) if device == "cpu" else total
    share = held / capacity if capacity else float("inf")
    verdict = "fits" if share < FITS else "tight" if share <= TIGHT else "does not fit"
    return {**out, "available": True, "total_bytes": total, "held_bytes": held, "breakdown": result.get("breakdown", {}),
            "peak_phase": result.get("peak_phase"), "assumptions": result.get("assumptions", []),
            "precision": result.get("precision"), "share": share, "verdict": verdict}


def estimate_for(studio: Studio, data: dict, device: str) -> dict:
    """The model process's validation and estimate of ``data`` on ``device``, cached in the home."""
    cache = EstimateCache(studio.home)
    key = cache.key(data, device)
    hit = cache.get(key)
    if hit is not None:
        return hit
    result = studio.ask("check", data=data, device=device, where="spec")
    if result.get("available"):
        cache.put(key, result)  # a failed estimate is asked again: its cause may be gone next time
    return result


def launch(studio: Studio, data: dict, name: str = "", priority: int = 0) -> dict:
    from jobs.runner.submit import submit_job

    data = resolve_dataset(studio, data)
    name = want_text(name, "name", NAME_LIMIT).strip() or None
    priority = want_int(priority or 0, "priority", -PRIORITY_LIMIT, PRIORITY_LIMIT)
    job = submit_job(studio.home, data, name=name, priority=priority, where="spec", policy=studio.policy,
                     validate=lambda spec, where: studio.ask("validate", data=spec, where=where))
    return job_summary(job)


def check_html(result: dict) -> str:
    if not result.get("available"):
        return message_html(f"Spec is valid. Memory estimate unavailable: {result.get('reason')}.", "info")
    parts = ", ".join(f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in result["breakdown"].items()
                      if isinstance(v, (int, float)))
    kind = {"fits": "ok", "tight": "warn", "does not fit": "error"}[result["verdict"]]
    peak = result.get("peak_phase")
    phase = f", highest while {html.escape(PHASES.get(peak, str(peak)))}" if peak else ""
    notes = "".join(f"<li>{html.escape(str(a))}</li>" for a in result.get("assumptions") or [])
    precision = result.get("precision") or {}  # the compute dtype and why (jobs/training/precision.py)
    computes = (f'<div class="estimate-parts">computes in {html.escape(str(precision["dtype"]))}: '
                f'{html.escape(str(precision.get("reason")))}</div>' if precision.get("dtype") else "")
    return (f'<div class="studio-msg studio-msg-{kind}"><b>{html.escape(result["verdict"])}</b>: about '
            f'{fmt_bytes(result.get("held_bytes", result["total_bytes"]))} of {fmt_bytes(result["device_bytes"])} '
            f'({html.escape(result["device"])}, {result["share"]:.0%}){phase}'
            + (f'<div class="estimate-parts">{html.escape(parts)}</div>' if parts else "") + computes
            + (f'<details class="estimate-parts"><summary>assumptions</summary><ul>{notes}</ul></details>'
               if notes else "") + "</div>")


# -- the page --------------------------------------------------------------------------------

class TrainForm:
    """Every widget of the tab, and the spec they describe."""

    def __init__(self, studio: Studio):
        METHODS, UPDATE_RULES = studio.catalog.methods, studio.catalog.rules  # noqa: N806 - the registries' view
        self.studio = studio
        start = starting_values()
        method0 = (start.get("method") or {}).get("name", "lora")
        rule0 = (start.get("optimizer") or {}).get("name", "adamw")
        with gr.Row(equal_height=True):
            self.model = gr.Textbox(label="Base model", value=studio.default_model, max_lines=1, scale=3,
                                    info="The bundled default, a Hub id, a local model folder or a .gguf file.",
                                    elem_id="train.model")
            self.dataset = gr.Dropdown(label="Dataset", choices=[], value=None, scale=2, elem_id="train.dataset",
                                       info="Upload more in the Datasets tab.")
        with gr.Accordion("Dataset settings", open=False):
            self.dataset_form = build_form(DatasetSpec, "dataset.", elem_prefix="train.dataset",
                                           exclude=("path", "eval_path"), defaults=start.get("dataset"), columns=4)
        with gr.Row(equal_height=False):
            with gr.Column(variant="panel"):
                self.method = gr.Dropdown(label="Method", choices=METHODS.names(), value=method0,
                                          elem_id="train.method")
                self.method_note = gr.Markdown(self._summary(METHODS, method0), elem_classes=["studio-note"])
                self.methods = self._groups(METHODS, "method", method0, start.get("method"))
            with gr.Column(variant="panel"):
                self.rule = gr.Dropdown(label="Update rule", choices=UPDATE_RULES.names(), value=rule0,
                                        elem_id="train.optimizer")
                self.rule_note = gr.Markdown(self._summary(UPDATE_RULES, rule0), elem_classes=["studio-note"])
                self.rules = self._groups(UPDATE_RULES, "optimizer", rule0, start.get("optimizer"))
        with gr.Group():
            self.training = build_form(TrainingSpec, "training.", elem_prefix="train.training",
                                       include=MAIN_TRAINING, defaults=start.get("training"), columns=4)
        with gr.Accordion("More training settings", open=False):
            self.training_more = build_form(TrainingSpec, "training.", elem_prefix="train.training",
                                            exclude=MAIN_TRAINING, defaults=start.get("training"), columns=4)

    def _groups(self, registry, section: str, chosen: str, start: dict | None) -> dict[str, tuple[gr.Group, Form]]:
        groups = {}
        for name, item in registry.items():
            with gr.Group(visible=name == chosen) as group:
                defaults = {k: v for k, v in (start or {}).items() if k != "name"} if name == chosen else None
                form = build_form(item.Config, f"{section}.", elem_prefix=f"train.{section}.{name}",
                                  defaults=defaults, columns=2)
                if not form.widgets:
                    gr.Markdown("This one has no settings.", elem_classes=["studio-note"])
            groups[name] = (group, form)
        return groups

    @staticmethod
    def _summary(registry, name: str) -> str:
        return registry.get(name).summary if name in registry else ""

    @property
    def inputs(self) -> set:
        comps = {self.model, self.dataset, self.method, self.rule}
        for form in self._forms():
            comps.update(form.components)
        return comps

    def _forms(self) -> list[Form]:
        return [self.dataset_form, self.training, self.training_more,
                *(f for _, f in self.methods.values()), *(f for _, f in self.rules.values())]

    def spec(self, values: dict) -> dict:
        method, rule = values[self.method], values[self.rule]
        if not values[self.dataset]:
            raise StudioError("no dataset chosen.", "dataset", "choose one, or upload it in the Datasets tab.")
        entry = self.studio.datasets.get(values[self.dataset])
        dataset = {"path": entry.file, **({"eval_path": entry.eval_file} if entry.eval_file else {}),
                   **self.dataset_form.read(values)}
        training = {**self.training.read(values), **self.training_more.read(values)}
        return {"model": (values[self.model] or "").strip(), "dataset": dataset,
                "method": {"name": method, **self.methods[method][1].read(values)},
                "optimizer": {"name": rule, **self.rules[rule][1].read(values)}, "training": training}

    def on_method(self, name: str) -> dict:
        """Show the chosen method's fields and start every learning rate at its suggestion."""
        METHODS = self.studio.catalog.methods  # noqa: N806
        out = {self.method_note: self._summary(METHODS, name)}
        out.update({group: gr.update(visible=m == name) for m, (group, _) in self.methods.items()})
        lr = getattr(METHODS.get(name), "suggested_lr", None) if name in METHODS else None
        if lr:
            for _, form in self.rules.values():
                if "lr" in form.widgets:
                    out[form.widgets["lr"].component] = lr
        return out

    def on_rule(self, name: str) -> dict:
        UPDATE_RULES = self.studio.catalog.rules  # noqa: N806
        out = {self.rule_note: self._summary(UPDATE_RULES, name)}
        out.update({group: gr.update(visible=r == name) for r, (group, _) in self.rules.items()})
        return out


def build(studio: Studio) -> dict:
    form = TrainForm(studio)
    with gr.Row(equal_height=True):
        device = gr.Dropdown(label="Estimate memory for", choices=device_choices(studio), scale=2, elem_id="train.device")
        name = gr.Textbox(label="Job name", placeholder="method-model", max_lines=1, scale=2, elem_id="train.name")
        priority = gr.Number(label="Priority", value=0, precision=0, scale=1, elem_id="train.priority",
                             info="Higher starts first.")
    estimate_box = gr.HTML(elem_id="train.estimate")
    with gr.Row():
        launch_btn = gr.Button("Launch", variant="primary", elem_id="train.launch", scale=0, min_width=200)
        status = gr.HTML(elem_id="train.status")
    launched = gr.State(None)

    def on_change(values: dict) -> str:
        try:
            return check_html(check(studio, form.spec(values), values[device] or "auto"))
        except Exception as e:
            return message_html(describe_failure(e), "error")

    def on_launch(values: dict):
        try:
            job = launch(studio, form.spec(values), values[name], values[priority] or 0)
        except Exception as e:
            return {status: message_html(describe_failure(e), "error")}
        return {status: message_html(f"Job #{job['id']} ({job['name']}) is queued; follow it in the Jobs tab."),
                launched: job["id"]}

    private = {"api_visibility": "private"}
    all_inputs = form.inputs | {device}
    form.method.change(form.on_method, form.method, {form.method_note, *(g for g, _ in form.methods.values()),
                       *(f.widgets["lr"].component for _, f in form.rules.values() if "lr" in f.widgets)}, **private)
    form.rule.change(form.on_rule, form.rule, {form.rule_note, *(g for g, _ in form.rules.values())}, **private)
    gr.on([c.change for c in all_inputs], on_change, all_inputs, estimate_box, trigger_mode="always_last",
          show_progress="hidden", **private)
    launch_btn.click(on_launch, all_inputs | {name, priority}, {status, launched}, **private)
    return {"dataset": form.dataset, "launched": launched, "device": device}


def register_api(studio: Studio) -> None:
    @for_api
    def estimate(spec: dict, device: str = "auto") -> dict:
        """Validate a spec and estimate its peak memory against a device (auto, cpu, cuda:N)."""
        return check(studio, spec, device)

    @for_api
    def launch_job(spec: dict, name: str = "", priority: int = 0) -> dict:
        """Validate a spec and queue it; dataset.path may name a stored dataset. Returns the job."""
        return launch(studio, spec, name, priority)

    gr.api(estimate, api_name="estimate")
    gr.api(launch_job, api_name="launch")
