"""The quantized form of a run (integer codes + scales + zeros) as a folder, and its loader.

A run whose result is an integer-grid model (PEQA, or QA-LoRA after folding its adapter
into the zero points) can be exported as that model: ``config.json``, the tokenizer,
``quantized_model.safetensors`` (every weight of the model; grid layers as packed codes,
scales and zeros) and ``quantization.json`` (which layers are grids and how to read them).
The weights file is not named ``model.safetensors`` on purpose: plain transformers would
load it with the grid layers missing and silently random-initialise them. Load it with
``load_quantized(folder)``.

``jobs.results.export.export_quantized`` checks the quantized model against the run's unmerged
reload and its trained fingerprint before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from adapters.quant.intgrid import GridLinear
from adapters.quant.targets import outermost, set_module
from adapters.core.errors import StudioError

WEIGHTS = "quantized_model.safetensors"
INDEX = "quantization.json"
FORMAT = "studio-intgrid-v1"


def save_quantized(model: nn.Module, out: Path, tokenizer=None, method: str | None = None) -> dict:
    """Write a model whose quantized layers are GridLinear into the (new or empty) folder ``out``;
    return how many layers are quantized and to how many bits."""
    from safetensors.torch import save_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grids = outermost(model, (GridLinear,))
    if not grids:
        raise ValueError("the model holds no integer-grid layer to export")
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_model(model, str(out / WEIGHTS))  # shares tied embeddings instead of failing on them
    index = {
        "format": FORMAT, "method": method,
        "dequantize": "weight[o, i] = scales[o, i // group_size] * (codes[o, i] - zeros[o, i // group_size]); "
                      "codes of <= 4 bits are packed two per byte in qweight (low nibble first)",
        "loader": "adapters.quant.export.load_quantized",
        "layers": {name: {"in_features": g.in_features, "out_features": g.out_features, "bits": g.bits,
                          "group_size": g.group_size, "bias": g.bias is not None, "from_conv1d": g.from_conv1d}
                   for name, g in grids.items()},
    }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return {"quantized_layers": len(grids), "bits": next(iter(grids.values())).bits}


def load_quantized(folder: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """Rebuild an exported quantized model: the architecture from config.json, grid layers in place."""
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / INDEX).is_file():
        raise StudioError(f"not a quantized export (no {INDEX}).", str(folder),
                          "pass a folder written by studio export --quantized.")
    index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    if index.get("format") != FORMAT:
        raise StudioError(f"unknown quantized format {index.get('format')!r}.", str(folder / INDEX),
                          f"this studio reads {FORMAT}.")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    for name, layer in index["layers"].items():
        set_module(model, name, GridLinear(layer["in_features"], layer["out_features"], layer["bits"],
                                           layer["group_size"], bias=layer["bias"],
                                           from_conv1d=layer.get("from_conv1d", False)))
    load_model(model, str(folder / WEIGHTS), strict=True)
    return model.requires_grad_(False).to(device).eval()
