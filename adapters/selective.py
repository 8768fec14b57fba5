"""Selective fine-tuning: the base model's own chosen tensors train, everything else is frozen.

Three selectors, whose union trains:
- ``patterns``: parameter names, as globs (``*.mlp.*``) or, prefixed ``re:``, regular expressions;
- ``kinds``: biases (BitFit), norms, embeddings, the output head;
- ``layers``: whole transformer blocks, as a Python slice (``-2:`` = the last two).

Nothing is added to the model, so merging is the identity and the saved state is just the
trained tensors plus the list of their names.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from adapters._blocks import find_blocks
from adapters.base import Context, Method, Params
from adapters.registry import METHODS
from adapters.core.errors import StudioError

WEIGHTS_FILE = "selected.safetensors"
CONFIG_FILE = "selected.json"
Kind = Literal["biases", "norms", "embeddings", "head"]
# The last two blocks: a strong, cheap baseline; used only when no selector is given.
DEFAULT_LAYERS = "-2:"
_LAYERS = re.compile(r"^\s*(-?\d+)?\s*(:\s*(-?\d+)?\s*)?$")


class SelectiveParams(Params):
    patterns: list[str] = Field(
        [], description="Parameter names to train: globs (model.layers.*.mlp.*) or 're:'-prefixed regular expressions.")
    kinds: list[Kind] = Field(
        [], description="Kinds to train everywhere: biases (BitFit), norms, embeddings, head "
                        "(a head tied to the embeddings trains with them).")
    layers: str | None = Field(
        DEFAULT_LAYERS, description="Blocks to train whole, as a slice: '-2:' the last two, '0:4' the first four, "
                                    "'5' one block. Default (-2:) only when neither patterns nor kinds are given.")

    @model_validator(mode="before")
    @classmethod
    def _layers_default_only_alone(cls, data: Any) -> Any:
        # Asking for biases should not silently also train the last two blocks.
        if isinstance(data, dict) and (data.get("patterns") or data.get("kinds")) and "layers" not in data:
            data = {**data, "layers": None}
        return data

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for p in value:
            if p.startswith("re:"):
                try:
                    re.compile(p[3:])
                except re.error as e:
                    raise ValueError(f"method.patterns: {p!r} is not a valid regular expression ({e}).") from None
        return value

    @field_validator("layers")
    @classmethod
    def _slice(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or not _LAYERS.match(value)):
            raise ValueError(f"method.layers: {value!r} is not a block slice; write e.g. '-2:', '0:4' or '5'.")
        return value

    @model_validator(mode="after")
    def _something_chosen(self) -> "SelectiveParams":
        if not (self.patterns or self.kinds or self.layers):
            raise ValueError("method.layers: nothing is selected; give patterns, kinds or layers (e.g. layers: '-2:').")
        return self


def block_range(layers: str, count: int) -> range:
    m = _LAYERS.match(layers)
    start, colon, stop = m.group(1), m.group(2), m.group(3)
    if colon is None:  # a single block, negative counting from the end
        i = int(start)
        i = i + count if i < 0 else i
        return range(i, i + 1) if 0 <= i < count else range(0)
    return range(count)[slice(int(start) if start else None, int(stop) if stop else None)]


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)) or \
        "norm" in type(module).__name__.lower()


def kinds_of(model: torch.nn.Module) -> dict[str, set[str]]:
    """Parameter names of each kind (tied parameters under the name named_parameters gives them)."""
    first_name = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, set[str]] = {k: set() for k in ("biases", "norms", "embeddings", "head")}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mod_name, module in model.named_modules():
        for leaf, p in module.named_parameters(recurse=False):
            name = first_name[id(p)]
            if leaf == "bias" or leaf.endswith("_bias"):
                found["biases"].add(name)
            if _is_norm(module):
                found["norms"].add(name)
            if isinstance(module, torch.nn.Embedding):
                found["embeddings"].add(name)
            if head is not None and module is head:
                found["head"].add(name)
    return found


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def select(model: torch.nn.Module, cfg: SelectiveParams) -> list[str]:
    """Names of the parameters the config picks, in the model's order."""
    names = [n for n, _ in model.named_parameters()]
    chosen = {n for n in names if any(_matches(n, p) for p in cfg.patterns)}
    by_kind = kinds_of(model)
    for kind in cfg.kinds:
        chosen |= by_kind[kind]
    blocks = None
    if cfg.layers:
        blocks = find_blocks(model)
        if blocks is None:
            raise StudioError("method.layers is set but this model has no list of blocks.", "method.layers",
                              "select by patterns or kinds instead.")
        wanted = set(block_range(cfg.layers, len(blocks)))
        chosen |= {n for n in names if blocks.index_of(n) in wanted}
    if not chosen:
        raise StudioError(_nothing_message(cfg, names, blocks), "method",
                          "adjust patterns (globs match the whole name), kinds or layers to this model's names.")
    return [n for n in names if n in chosen]


def _nothing_message(cfg: SelectiveParams, names: list[str], blocks) -> str:
    picked = ", ".join(f"{k}={getattr(cfg, k)!r}" for k in ("patterns", "kinds", "layers") if getattr(cfg, k))
    sample = ", ".join(names[:4] + (["..."] if len(names) > 5 else []) + names[-1:])
    stack = f"; it has {len(blocks)} blocks under {blocks.prefix}" if blocks is not None else ""
    return (f"the selection ({picked}) matches no parameter of this model. "
            f"Its parameter names look like: {sample}{stack}.")


@dataclass(frozen=True)
class SelectiveMethod(Method):
    name: str = "selective"
    summary: str = "Train only chosen tensors of the base (by name, kind or block); merging is trivial."
    Config: type[Params] = SelectiveParams
    merge_tolerance: float = 0.0
    merge_blocker: str | None = None
    # Between full fine-tuning (2e-5) and small adapters: whole blocks train at full-model rates,
    # biases and norms alone tolerate more (raise it to ~1e-3 for those).
    suggested_lr: float = 5e-5

    def check(self, cfg: Params, spec: Any) -> None:
        pass

    def apply(self, model: torch.nn.Module, cfg: Params, ctx: Context) -> torch.nn.Module:
        chosen = set(select(model, cfg))
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            if name in chosen:
                # A half-precision base would round small updates away: trained tensors stay fp32.
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
                p.requires_grad_(True)
        return model

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        trained = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        if not trained:
            raise RuntimeError("selective: the model has no trained tensor to save")
        save_file(trained, str(out_dir / WEIGHTS_FILE))
        (out_dir / CONFIG_FILE).write_text(json.dumps(
            {"method": self.name, "parameters": list(trained),
             "numel": sum(t.numel() for t in trained.values())}, indent=2))

    def load(self, base: torch.nn.Module, adapter_dir: Path, cfg: Params, ctx: Context) -> torch.nn.Module:
        from safetensors.torch import load_file

        adapter_dir = Path(adapter_dir)
        try:
            listed = json.loads((adapter_dir / CONFIG_FILE).read_text())["parameters"]
            tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
        except (OSError, ValueError, KeyError) as e:
            raise StudioError(f"selective folder is incomplete or unreadable ({e}).", str(adapter_dir),
                              f"point at a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}.") from None
        params = dict(base.named_parameters(remove_duplicate=False))
        unknown = [n for n in listed if n not in params or n not in tensors]
        if unknown:
            raise StudioError(f"the saved tensors do not fit this base (e.g. {unknown[:3]}).", str(adapter_dir),
                              "load them onto the model they were trained from (see the run's spec).")
        with torch.no_grad():
            for name in listed:
                if params[name].shape != tensors[name].shape:
                    raise StudioError(f"{name} has shape {tuple(tensors[name].shape)} in the folder but "
                                      f"{tuple(params[name].shape)} in the base.", str(adapter_dir),
                                      "load it onto the model it was trained from.")
                # Trained tensors were fp32 over a bf16 base: copying into the bf16 tensor would round
                # them, and the reload would not be the model that trained (the fingerprint caught it).
                params[name].data = tensors[name].to(params[name].device)
        return base

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        return model


METHODS.register(SelectiveMethod())
