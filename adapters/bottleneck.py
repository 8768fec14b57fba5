"""Bottleneck adapters: a small down-projection, non-linearity and up-projection per block.

``series_adapter`` (Houlsby et al., 2019) transforms the output of the attention and MLP
sublayers, inside the residual branch: ``h -> h + s * up(act(down(h)))``.
``parallel_adapter`` (He et al., 2022) runs beside a sublayer on the sublayer's own input:
``out -> out + s * up(act(down(x)))``, by default beside the MLP only.

Both attach through forward hooks on the unchanged sublayers, with the adapter registered as
a child of the sublayer, so the base model's parameter names and code stay as they are and
any family whose blocks have attention and MLP children works. The up projection starts at
zero: the adapted model computes exactly what the base does until the first step.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from adapters._blocks import ATTENTION_NAMES, MLP_NAMES, child_named, require_blocks
from adapters.base import Context, Method, Params
from adapters.registry import METHODS
from adapters.core.errors import CannotMerge, StudioError

ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}
WEIGHTS_FILE = "bottleneck_adapter.safetensors"
CONFIG_FILE = "bottleneck_adapter.json"
Position = Literal["attention", "mlp"]


class SeriesParams(Params):
    bottleneck: int = Field(64, ge=1, le=16384, description="Width of the bottleneck (64 adds ~0.9% to SmolLM2).")
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="Between down and up projection; it is why the adapter cannot be merged.")
    scaling: float = Field(1.0, gt=0, le=100, description="Multiplies the adapter's output.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the bottleneck activation (0 keeps steps deterministic).")
    positions: list[Position] = Field(["attention", "mlp"], min_length=1,
                                      description="Sublayers whose output passes through an adapter (Houlsby: both).")

    @field_validator("positions")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class ParallelParams(SeriesParams):
    # He et al. found a scaled parallel adapter beside the MLP the strongest single placement.
    scaling: float = Field(4.0, gt=0, le=100, description="Multiplies the adapter's output (He et al.: 4).")
    positions: list[Position] = Field(["mlp"], min_length=1,
                                      description="Sublayers an adapter runs beside: mlp, and optionally attention.")


class Bottleneck(torch.nn.Module):
    """down -> act -> dropout -> up, scaled; remembers its own settings so a folder can describe it."""

    def __init__(self, dim: int, settings: dict):
        super().__init__()
        self.settings = dict(settings)
        self.down = torch.nn.Linear(dim, settings["bottleneck"])
        self.act = ACTIVATIONS[settings["non_linearity"]]()
        self.drop = torch.nn.Dropout(settings["dropout"])
        self.up = torch.nn.Linear(settings["bottleneck"], dim)
        self.scaling = float(settings["scaling"])
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Adapters keep fp32 weights over a half-precision base; autocast (when on) picks the matmul dtype.
        y = self.up(self.drop(self.act(self.down(x.to(self.down.weight.dtype)))))
        return (y * self.scaling).to(x.dtype)


def _split(output: Any) -> tuple[torch.Tensor, tuple]:
    # Attention sublayers return (hidden, attention weights, ...); MLPs return the hidden states.
    return (output[0], tuple(output[1:])) if isinstance(output, tuple) else (output, None)


def _join(hidden: torch.Tensor, rest: tuple | None) -> Any:
    return hidden if rest is None else (hidden, *rest)


def _series_hook(child: str):
    def hook(module, args, kwargs, output):
        hidden, rest = _split(output)
        return _join(hidden + getattr(module, child)(hidden), rest)
    return hook


def _parallel_hook(child: str):
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        hidden, rest = _split(output)
        return _join(hidden + getattr(module, child)(x), rest)
    return hook


def _hidden_size(model: torch.nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


@dataclass(frozen=True)
class BottleneckMethod(Method):
    name: str
    summary: str
    Config: type[Params]
    placement: Literal["series", "parallel"]
    merge_blocker: str | None = (
        "a bottleneck adapter has a non-linearity between its down and up projection, so its output "
        "is not a linear function of the input and cannot be folded into any base weight.")
    merge_tolerance: float = 0.0
    # LLM-Adapters (Hu et al., 2023) trained both placements at 3e-4.
    suggested_lr: float = 3e-4

    def check(self, cfg: Params, spec: Any) -> None:
        pass

    def attach(self, model: torch.nn.Module, cfg: Params) -> torch.nn.Module:
        blocks = require_blocks(model, self.name, need_sublayers=True)
        dim = _hidden_size(model)
        settings = cfg.model_dump(exclude={"positions"})
        hook = _series_hook if self.placement == "series" else _parallel_hook
        for block in blocks.modules:
            for position in cfg.positions:
                _, sublayer = child_named(block, ATTENTION_NAMES if position == "attention" else MLP_NAMES)
                if hasattr(sublayer, self.name):
                    raise StudioError(f"this model already carries a {self.name}.", "method",
                                      "start from the base model, not an adapted one.")
                ref = next(sublayer.parameters(), None)
                adapter = Bottleneck(dim, settings)
                if ref is not None:
                    adapter.to(ref.device)
                sublayer.add_module(self.name, adapter)
                sublayer.register_forward_hook(hook(self.name), with_kwargs=True)
        return model

    def apply(self, model: torch.nn.Module, cfg: Params, ctx: Context) -> torch.nn.Module:
        model.requires_grad_(False)
        self.attach(model, cfg)
        for p in self._adapter_params(model).values():
            p.requires_grad_(True)
        return model

    def _adapter_params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        marker = f".{self.name}."
        return {n: p for n, p in model.named_parameters() if marker in n}

    def save(self, model: torch.nn.Module, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        adapters = [(n, m) for n, m in model.named_modules() if isinstance(m, Bottleneck)]
        if not adapters:
            raise RuntimeError(f"{self.name}: the model carries no adapter to save")
        positions = sorted({"attention" if n.rsplit(".", 2)[-2] in ATTENTION_NAMES else "mlp" for n, _ in adapters})
        config = {"method": self.name, "config": {**adapters[0][1].settings, "positions": positions},
                  "base_hidden_size": _hidden_size(model), "adapters": len(adapters)}
        tensors = {n: p.detach().contiguous().cpu() for n, p in self._adapter_params(model).items()}
        save_file(tensors, str(out_dir / WEIGHTS_FILE))
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    def load(self, base: torch.nn.Module, adapter_dir: Path, cfg: Params, ctx: Context) -> torch.nn.Module:
        from safetensors.torch import load_file

        adapter_dir = Path(adapter_dir)
        try:
            saved = json.loads((adapter_dir / CONFIG_FILE).read_text())
            tensors = load_file(str(adapter_dir / WEIGHTS_FILE))
        except (OSError, ValueError) as e:
            raise StudioError(f"{self.name} adapter folder is incomplete or unreadable ({e}).", str(adapter_dir),
                              f"point at a folder holding {CONFIG_FILE} and {WEIGHTS_FILE}.") from None
        if saved.get("method") != self.name:
            raise StudioError(f"this folder holds a {saved.get('method')!r} adapter, not {self.name}.",
                              str(adapter_dir), f"load it with method {saved.get('method')!r}.")
        if saved.get("base_hidden_size") != _hidden_size(base):
            raise StudioError(f"the adapter was trained on a base of width {saved.get('base_hidden_size')}, "
                              f"this base has {_hidden_size(base)}.", str(adapter_dir),
                              "load it onto the model it was trained from (see the run's spec).")
        # The folder describes itself: its own config wins over whatever the caller passes.
        model = self.attach(base, self.Config(**saved["config"]))
        expected = self._adapter_params(model)
        if set(expected) != set(tensors):
            raise StudioError(f"adapter weights do not match the base's blocks (missing "
                              f"{sorted(set(expected) - set(tensors))[:3]}, unexpected "
                              f"{sorted(set(tensors) - set(expected))[:3]}).", str(adapter_dir),
                              "load it onto the model it was trained from (see the run's spec).")
        with torch.no_grad():
            for name, p in expected.items():
                p.copy_(tensors[name])
        return model

    def merge(self, model: torch.nn.Module) -> torch.nn.Module:
        raise CannotMerge(self.merge_blocker, self.name,
                          "export the adapter instead (studio export RUN --adapter OUT); the studio loads it "
                          "onto the base model again.")


METHODS.register(BottleneckMethod(
    name="series_adapter",
    summary="Houlsby bottleneck adapters after attention and after the MLP; cannot be merged.",
    Config=SeriesParams,
    placement="series",
))
METHODS.register(BottleneckMethod(
    name="parallel_adapter",
    summary="Scaled bottleneck adapter beside the MLP (optionally beside attention); cannot be merged.",
    Config=ParallelParams,
    placement="parallel",
))
