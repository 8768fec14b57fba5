"""Quantized layers written beside a run's adapter, so loading restores them bit for bit.

Methods that quantize the base (QLoRA), change it by initialisation (LoftQ) or train its
quantized state (PEQA, QA-LoRA) keep that state here instead of re-quantizing the base at load time: the
base may have been loaded in bf16 on a GPU for training and in fp32 on the CPU for export,
and re-quantizing different inputs would give a slightly different model than the one
that trained. The file holds only the quantized layers (about half a byte per weight at
4 bits), never the rest of the base.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from adapters.core import compat
from adapters.quant import nf4
from adapters.quant.intgrid import GridLinear
from adapters.quant.targets import outermost, set_module
from adapters.core.errors import StudioError

TENSORS = "quantized_layers.safetensors"
INDEX = "quantized_layers.json"


def save_layers(out_dir: Path, layers: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = {f"{name}.{key}": t.detach().contiguous().cpu() for name, state in layers.items() for key, t in state.items()}
    save_file(flat, str(out_dir / TENSORS))
    (out_dir / INDEX).write_text(json.dumps({**meta, "layers": sorted(layers)}, indent=2) + "\n", encoding="utf-8")


def read_layers(folder: Path, device: torch.device | str = "cpu") -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / INDEX).is_file() or not (folder / TENSORS).is_file():
        raise StudioError(f"the quantized base layers are missing ({INDEX}, {TENSORS}).", str(folder),
                          "this folder was not written by this method; retrain, or point at the run's adapter/.")
    meta = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    flat = load_file(str(folder / TENSORS), device=str(device))
    layers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in meta["layers"]}
    for key, t in flat.items():
        name = next((n for n in layers if key.startswith(n + ".")), None)
        if name is None:
            raise StudioError(f"unexpected tensor {key!r} in {TENSORS}.", str(folder), "retrain the run.")
        layers[name][key[len(name) + 1:]] = t
    return meta, layers


def save_bnb_layers(model: nn.Module, out_dir: Path, method: str) -> None:
    """Save every bitsandbytes layer of a (peft-wrapped) model bit for bit."""
    base = compat.bare_model(model)
    layers = {strip_wrapper(n): nf4.state_of(m) for n, m in base.named_modules() if nf4.is_bnb_linear(m)}
    bits = 8 if any("SCB" in s for s in layers.values()) else 4
    save_layers(out_dir, layers, {"method": method, "format": f"bitsandbytes-{bits}bit", "bits": bits})


def has_saved_layers(folder: Path) -> bool:
    return (Path(folder) / INDEX).is_file()


def restore_bnb_layers(base: nn.Module, folder: Path, compute_dtype: torch.dtype) -> nn.Module:
    """Put the saved bitsandbytes layers in place of the fresh base's linear layers, in place."""
    base.requires_grad_(False)
    meta, layers = read_layers(folder, next(base.parameters()).device)
    for name, tensors in layers.items():
        set_module(base, name, nf4.from_state(tensors, base.get_submodule(name), compute_dtype))
    # peft picks its bitsandbytes-aware LoRA layers only for models flagged as loaded this way.
    compat.mark_quantized_base(base, 8 if meta.get("bits") == 8 else 4)
    return base


def strip_wrapper(name: str) -> str:
    """A layer's name in the bare model, given its name inside a peft adapter layer."""
    return name.removesuffix(".base_layer")


def save_grid_layers(model: nn.Module, out_dir: Path, method: str, adapters: tuple[type, ...] = ()) -> None:
    """Save every grid layer, or the adapter layer wrapping it (whose state includes the grid)."""
    layers = outermost(model, (*adapters, GridLinear))
    grids = [m for m in model.modules() if isinstance(m, GridLinear)]
    save_layers(out_dir, {n: m.state_dict() for n, m in layers.items()},
                {"method": method, "bits": grids[0].bits, "group_size": grids[0].group_size,
                 "adapted": sorted(n for n, m in layers.items() if not isinstance(m, GridLinear))})


def restore_grid_layers(base: nn.Module, folder: Path,
                        wrap: Callable[[GridLinear], nn.Module] | None = None) -> nn.Module:
    """Put the saved grid layers (wrapped by ``wrap`` where an adapter was saved) in place of the
    fresh base's linear layers, keeping its other weights."""
    base.requires_grad_(False)
    meta, layers = read_layers(folder, next(base.parameters()).device)
    adapted = set(meta.get("adapted", []))
    for name, tensors in layers.items():
        layer: nn.Module = GridLinear.shell_like(base.get_submodule(name), meta["bits"], meta["group_size"])
        if name in adapted:
            if wrap is None:
                raise StudioError(f"layer {name} was saved with an adapter this method does not know.",
                                  str(folder), "load the run with the method that trained it.")
            layer = wrap(layer)
        layer.load_state_dict(tensors)
        set_module(base, name, layer.requires_grad_(False))
    return base
