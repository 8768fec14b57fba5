"""Which linear layers a quantized method replaces, and swapping a module in place.

Every quantized method quantizes the same set: the model's linear layers (GPT-2's Conv1D
counts as one, transposed) except the output head, which stays in full precision as in
QLoRA, because its errors land directly on the logits and tied heads share the embedding.
"""
from __future__ import annotations

import torch
from torch import nn

from adapters.core.errors import StudioError


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers without GPT-2 style layers
        return ()
    return (Conv1D,)


def is_plain_linear(module: nn.Module) -> bool:
    """An ordinary fp linear layer (quantized layers subclass nn.Linear too, so match exactly)."""
    return type(module) is nn.Linear or isinstance(module, _conv1d_class())


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer's own layout."""
    if is_conv1d(module):
        return module.weight.detach().t()
    return module.weight.detach()


def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, _conv1d_class())


def plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool = False) -> nn.Module:
    """A frozen fp32 layer holding ``weight`` (out, in), in the layout the model was built with,
    so a merged model loads in plain transformers."""
    out_features, in_features = weight.shape
    if conv1d:
        layer = _conv1d_class()[0](out_features, in_features)
        data = weight.t()
    else:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        data = weight
    layer.weight = nn.Parameter(data.float().contiguous(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return layer


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter else None


def find_linears(model: nn.Module, target_modules: str | list[str] = "all-linear",
                 where: str = "method.target_modules") -> list[tuple[str, nn.Module]]:
    """Linear layers to quantize: all but the output head, or those named by ``target_modules``.

    A name matches as in peft: equal to the module's full name or to its last dotted parts.
    """
    head = output_head(model)
    linears = [(n, m) for n, m in model.named_modules() if is_plain_linear(m) and m is not head]
    if isinstance(target_modules, str) and target_modules.lower() != "all-linear":
        target_modules = [target_modules]
    if isinstance(target_modules, list):
        wanted = set(target_modules)
        linears = [(n, m) for n, m in linears if n in wanted or any(n.endswith("." + w) for w in wanted)]
    if not linears:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_plain_linear(m)})
        raise StudioError(f"no linear layer of this model matches {target_modules!r}.", where,
                          f"use 'all-linear' or names among: {', '.join(names[:12]) or '(none)'}.")
    return linears


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def check_groups(linears: list[tuple[str, nn.Module]], group_size: int | None, where: str) -> None:
    """Every layer's input width must split into whole quantization groups."""
    if group_size is None:
        return
    for name, module in linears:
        width = linear_weight(module).shape[1]
        if width % group_size:
            divisors = [g for g in (16, 32, 64, 128, 256) if width % g == 0]
            raise StudioError(
                f"group_size {group_size} does not divide the input width {width} of layer {name}.", where,
                f"choose a group size that divides every layer's input width (for this layer: "
                f"{', '.join(map(str, divisors)) or 'none of 16-256; leave group_size empty'}).")


def held_bytes(module: nn.Module) -> int:
    """Bytes a layer holds for its weights: parameters, buffers and bitsandbytes quantization state."""
    total = 0
    seen: set[int] = set()

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in list(module.parameters()) + list(module.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:  # NF4: absmax (itself quantized under double quantization) + code books
            add(state.absmax)
            add(state.code)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
        add(getattr(t, "SCB", None))  # int8: per-row scales, on the weight until the first forward...
    add(getattr(getattr(module, "state", None), "SCB", None))  # ...then on the layer's state
    return total


def outermost(model: nn.Module, types: tuple[type, ...]) -> dict[str, nn.Module]:
    """Modules of the given types that are not inside another one of them, by name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and not any(name.startswith(p + ".") for p in found):
            found[name] = module
    return found
