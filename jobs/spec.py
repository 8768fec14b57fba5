"""The job spec: one validated description of a fine-tune (YAML or JSON).

Method and update-rule parameters are validated by the method's / rule's own
``Config`` from the registry, so this file never lists them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from adapters.core.errors import StudioError

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Upper bounds: far above any run this studio is for, low enough that a typo or a hostile
# caller cannot ask for a run that never ends or an allocation that takes the machine down.
MAX_STEPS = 1_000_000
MAX_SEQ_LEN = 131_072
MAX_BATCH = 4096
MAX_DEVICES = 1024
PATH_LIMIT = 4096
# Method and update-rule parameters are checked by their own Configs; these catch what
# those leave open (no NaN or infinity anywhere, no absurd magnitudes).
PARAM_INT_LIMIT = 1_000_000
PARAM_FLOAT_LIMIT = 1e9


class Section(BaseModel):
    # No NaN or infinity in any float field: either would train nothing, or forever.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DatasetSpec(Section):
    path: str = Field(max_length=PATH_LIMIT, description="JSONL, JSON, CSV or Parquet file, or a saved `datasets` folder.")
    format: Literal["auto", "instruction", "chat", "prompt_completion", "text"] = Field(
        "auto", description="Row format; auto detects it from the columns.")
    eval_path: str | None = Field(None, max_length=PATH_LIMIT, description="Separate held-out file (same format).")
    eval_fraction: float = Field(
        0.1, ge=0.0, le=0.5,
        description="Share of the training file held out when no eval_path is given.")
    max_eval_rows: int = Field(
        200, ge=1, le=1_000_000, description="Evaluate on at most this many held-out rows (keeps evaluation cheap).")


class TrainingSpec(Section):
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps; overrides epochs.")
    epochs: float = Field(1.0, gt=0, le=1000, description="Passes over the training rows when max_steps is unset.")
    batch_size: int = Field(8, ge=1, le=MAX_BATCH, description="Rows per micro-batch (per device).")
    grad_accum: int = Field(1, ge=1, le=MAX_BATCH, description="Micro-batches per optimizer step.")
    max_seq_len: int = Field(512, ge=8, le=MAX_SEQ_LEN, description="Rows are truncated to this many tokens.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Learning-rate decay after warmup.")
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS, description="Linear warmup steps from 0 to the peak learning rate.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that multiplies it natively and on CPUs that measure it at least 1.5x as fast as fp32, "
                "else fp32. fp16: a GPU, and lomo, adalomo or mezo (the other rules have no loss scaling).")
    gradient_checkpointing: StrictBool = Field(False, description="Recompute activations in backward to save memory.")
    lean_activations: StrictBool = Field(
        True, description="RMSNorm and SwiGLU that keep only their inputs for backward (same maths, less memory).")
    share_prefix: StrictBool = Field(
        True, description="Compute once the leading tokens every row of a batch shares (same maths, less work).")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seeds initialisation, data order and dropout.")
    log_every: int = Field(1, ge=1, le=MAX_STEPS, description="Write a metrics line every N steps.")
    eval_every: int = Field(0, ge=0, le=MAX_STEPS, description="Evaluate every N steps (0: only at the end).")
    save_every: int = Field(0, ge=0, le=MAX_STEPS, description="Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Older checkpoints are deleted beyond this many.")
    eval_samples: int = Field(3, ge=0, le=1000, description="Sample generations logged per evaluation.")
    exact_match_rows: int = Field(32, ge=0, le=100_000, description="Held-out rows scored by greedy exact match per evaluation.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Generation length for samples and exact match.")
    loss_chunk_tokens: int = Field(
        512, ge=16, le=MAX_SEQ_LEN, description="Trained positions per chunk of the vocabulary projection (bounds logits memory).")
    devices: int = Field(1, ge=1, le=MAX_DEVICES, description="Data-parallel processes per machine (GPUs, or CPU processes on gloo).")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="none: every process holds the whole model (DDP when devices > 1); fsdp: parameters, "
        "gradients and optimizer state sharded across processes (FSDP2).")
    nnodes: int = Field(1, ge=1, le=MAX_DEVICES, description="Machines taking part; world size is nnodes x devices.")
    node_rank: int = Field(0, ge=0, le=MAX_DEVICES - 1, description="This machine's index; node 0 hosts the rendezvous.")
    rdzv_endpoint: str | None = Field(
        None, max_length=261, pattern=r"^[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$", description="host:port on node 0 that every node reaches; required when nnodes > 1.")
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, max_length=2, description="Experiment trackers to log to: tensorboard, mlflow (extra [trackers]).")
    mlflow_tracking_uri: str | None = Field(
        None, max_length=2048, description="MLflow server or store; empty: mlruns/ in the studio home.")

    @model_validator(mode="after")
    def _multi_node(self):
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port on node 0)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        return self


class JobSpec(Section):
    model: str = Field(DEFAULT_MODEL, min_length=1, max_length=PATH_LIMIT, description="Hub id, local Hugging Face folder, or .gguf file.")
    dataset: DatasetSpec
    method: dict[str, Any] = Field(default_factory=lambda: {"name": "lora"},
                                   description="Fine-tuning method: name and its parameters (or just the name).")
    optimizer: dict[str, Any] = Field(default_factory=lambda: {"name": "adamw"},
                                      description="Update rule: name and its parameters (or just the name).")
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output_dir: str = Field(max_length=PATH_LIMIT, description="Run folder to write (created; must not hold another run). "
                                        "Spec files may leave it out: a new folder under the studio home's runs/.")
    trust_remote_code: StrictBool = Field(False, description="Allow model code from the model's folder or the Hub.")

    @field_validator("method", "optimizer", mode="before")
    @classmethod
    def _name_alone(cls, value, info):
        if isinstance(value, str):
            return {"name": value}  # `method: lora` means lora with its defaults
        if not isinstance(value, dict):
            raise ValueError(f"needs a 'name' and the parameters, e.g. {{name: lora, r: 8}}, or just a name; "
                             f"got a {type(value).__name__}")
        return value

    # Replace the loose dicts by their validated, defaults-filled form.
    @field_validator("method")
    @classmethod
    def _resolve_method(cls, value):
        return _resolve_part("method", value)

    @field_validator("optimizer")
    @classmethod
    def _resolve_optimizer(cls, value):
        return _resolve_part("optimizer", value)

    # Typed views of the resolved parts.
    @property
    def method_name(self) -> str:
        return self.method["name"]

    @property
    def optimizer_name(self) -> str:
        return self.optimizer["name"]

    def method_config(self):
        from adapters import METHODS
        m = METHODS.get(self.method_name)
        return m, m.Config(**{k: v for k, v in self.method.items() if k != "name"})

    def optimizer_config(self):
        from adapters import UPDATE_RULES
        r = UPDATE_RULES.get(self.optimizer_name)
        return r, r.Config(**{k: v for k, v in self.optimizer.items() if k != "name"})

    def resolved(self) -> dict:
        return self.model_dump(mode="json")


def _resolve_part(section: str, value: dict) -> dict:
    from adapters import METHODS, UPDATE_RULES
    registry = METHODS if section == "method" else UPDATE_RULES
    if not isinstance(value, dict) or "name" not in value:
        raise ValueError(f"needs a 'name' ({', '.join(registry.names())})")
    name = value["name"]
    if name not in registry:
        raise ValueError(f"unknown {registry.kind} {name!r}; use one of: {', '.join(registry.names())}")
    cls = registry.get(name).Config
    params = {k: v for k, v in value.items() if k != "name"}
    try:
        cfg = cls(**params)
    except ValidationError as e:
        raise ValueError(_describe(e, prefix=f"{section}.", model=cls)) from None
    for key, value in cfg.model_dump().items():  # before JSON, which would turn NaN into null
        check_number(value, f"{section}.{key}")
    return {"name": name, **cfg.model_dump(mode="json")}


def check_number(value: Any, where: str) -> None:
    """Backstop for method and update-rule parameters: finite, and of a sane magnitude."""
    if isinstance(value, bool):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            check_number(item, where)
    elif isinstance(value, int) and abs(value) > PARAM_INT_LIMIT:
        raise ValueError(f"{where}: {value} is beyond the limit of {PARAM_INT_LIMIT:,}.")
    elif isinstance(value, float) and not (abs(value) <= PARAM_FLOAT_LIMIT):  # NaN fails too
        raise ValueError(f"{where}: {value} is not a finite number within ±{PARAM_FLOAT_LIMIT:g}.")


def _describe(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    lines = []
    for e in err.errors():
        loc = prefix + ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(model, e["loc"][:-1]) if model else []
            hint = f" Valid keys here: {', '.join(valid)}." if valid else ""
            lines.append(f"{loc}: unknown key.{hint}")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required but missing.")
        elif msg.startswith(("method.", "optimizer.")):
            lines.append(msg)  # already located by the part's own Config
        else:
            got = e.get("input")
            shown = f" (got {got!r})" if isinstance(got, (str, int, float, bool)) or got is None else ""
            lines.append(f"{loc}: {msg}{shown}.")
    return " ".join(lines)


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return list(model.model_fields)


def parse_spec(data: Any, where: str = "spec") -> JobSpec:
    if not isinstance(data, dict):
        raise StudioError("a spec must be a mapping of sections (model, dataset, method, ...).", where,
                          "start from the example spec in the README.")
    try:
        return JobSpec(**data)
    except ValidationError as e:
        raise StudioError(_describe(e, model=JobSpec), where,
                          "correct the fields named above (the README lists every section).") from None


def read_spec_file(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise StudioError("spec file not found.", str(p), "pass the path of a YAML or JSON spec.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise StudioError("spec is not UTF-8 text.", str(p), "save it as UTF-8.") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise StudioError(f"spec is not valid {'JSON' if p.suffix.lower() == '.json' else 'YAML'}: {e}", str(p),
                          "fix the syntax at the line shown.") from None
    return data


def apply_overrides(data: dict, overrides: list[str], where: str = "--set") -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML scalars)."""
    data = json.loads(json.dumps(data or {}))
    for item in overrides:
        if "=" not in item:
            raise StudioError(f"override {item!r} has no '='.", where, "write section.key=value, e.g. training.max_steps=50.")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise StudioError(f"{key!r}: {p!r} is not a section.", where, "override a key inside a section.")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def relative_to(data: dict, base: Path) -> dict:
    """``data`` with its relative dataset paths taken from ``base`` (the spec file's folder, or the
    folder of whoever submitted the spec), since the job reads them from elsewhere."""
    data = dict(data)
    ds = data.get("dataset")
    if isinstance(ds, dict):
        ds = dict(ds)
        for key in ("path", "eval_path"):
            value = ds.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                ds[key] = str((Path(base) / value).resolve())
        data["dataset"] = ds
    return data


def with_paths(data: dict, spec_file: Path, home: Path | None = None) -> dict:
    """Dataset paths are relative to the spec file; a missing output_dir gets a fresh run folder."""
    data = relative_to(data, spec_file.parent)
    if not data.get("output_dir"):
        from datetime import datetime

        from jobs.home import studio_home
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        data["output_dir"] = str((home or studio_home()) / "runs" / f"{spec_file.stem}-{stamp}")
    return data


def load_spec(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    data = apply_overrides(read_spec_file(path), overrides or [])
    if isinstance(data, dict):
        data = with_paths(data, Path(path))
    spec = parse_spec(data, where=str(path))
    check_combination(spec, where=str(path))
    return spec


def check_combination(spec: JobSpec, where: str = "spec") -> None:
    """Cross-section checks owned by the method and the update rule themselves."""
    method, mcfg = spec.method_config()
    rule, rcfg = spec.optimizer_config()
    if spec.training.sharding == "fsdp":
        check_sharding(spec, where)
    for part in (method.check, rule.check):
        try:
            part(mcfg if part is method.check else rcfg, spec)
        except StudioError as e:
            raise StudioError(e.what, where if not e.where else f"{where}: {e.where}", e.fix) from None


def check_sharding(spec: JobSpec, where: str = "spec") -> None:
    """``sharding: fsdp`` only with the methods and update rules that declare no ``fsdp_blocker``
    (adapters/base.py): each says why it cannot train sharded and what to use instead."""
    t = spec.training
    if t.devices * t.nnodes == 1:  # one process has nothing to shard across; it would run unsharded
        raise StudioError("sharding: fsdp needs more than one process, and this spec runs one (devices 1, nnodes 1).",
                          f"{where}: training.sharding", "set training.devices to 2 or more, or use sharding: none.")
    method, _ = spec.method_config()
    rule, _ = spec.optimizer_config()
    for kind, part in (("method", method), ("update rule", rule)):
        blocker = part.fsdp_blocker
        if blocker is not None:
            raise StudioError(f"the {kind} {part.name!r} cannot train sharded: {blocker.why}.",
                              f"{where}: training.sharding", f"{blocker.instead}.")
