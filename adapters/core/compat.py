"""Every touch of another library's private or undocumented internals, in one place.

The studio relies on a handful of behaviours of transformers, peft and bitsandbytes that
their public APIs do not cover. Each has one function here that says what it relies on and
why, and uses the public API where one exists; ``tests/test_compat.py`` pins each behaviour,
so an upgrade that changes one fails there, loudly, instead of silently changing the maths
or the memory. Nothing here is imported at module level: this module sits in the bottom
package, which the torch-free web process may import.

Relied on (checked with transformers 5.x, peft 0.18-0.21, bitsandbytes 0.4x-0.50):
- transformers: ``model.set_attn_implementation`` accepts a name registered with
  ``AttentionInterface``; ``PreTrainedModel._can_set_attn_implementation`` (private) says whether
  a model dispatches attention through that interface at all.
- transformers: a model loaded from a GGUF file keeps ``hf_quantizer`` although its weights are
  plain tensors, and refuses ``save_pretrained`` until ``remove_quantization_config`` ran.
- peft: its LoRA/IA3 models pick their bitsandbytes-aware layers only when the base model has
  ``is_loaded_in_4bit``/``is_loaded_in_8bit`` set (as ``from_pretrained`` with a quantization
  config would); we quantize layers ourselves, so we set the flag.
- peft: ``BaseTunerLayer.cast_input_dtype_enabled`` is the switch its own
  ``disable_input_dtype_casting`` context flips; we flip it for the whole run.
- bitsandbytes: ``bitsandbytes.functional.name2qmap`` caches the NF4/FP4 code book on the device
  of the first tensor quantized.
- transformers: a causal LM's ``forward`` takes a ``DynamicCache`` it fills in place (the loss's
  shared prefix), by the keyword ``cache`` or, before that, ``past_key_values``.
- torch: a module's ``forward`` may be replaced on one instance (``nn.Module.__call__`` looks it
  up on the instance), leaving the class and saved models untouched.
- torch (private, checked with torch 2.13): ``TorchDispatchMode`` and ``tree_leaves`` under
  ``torch.utils._python_dispatch`` / ``_pytree`` (the memory estimator counts every tensor an op
  makes); a tensor's ``_version`` counter (the fused layers' saved-output rebuild); a module's
  ``_forward_hooks``/``_forward_pre_hooks`` dicts (the loss's plain-head shortcut); the op
  ``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the log-sum-exp the public
  SDPA drops (the short-row attention); ``torch.cpu._is_amx_tile_supported`` (precision choice).
"""
from __future__ import annotations

import sys
import types
from typing import Any, Callable


# --- torch / transformers: modules and attention ------------------------------------------------


def replace_forward(module: Any, forward: Callable) -> None:
    """Run ``forward(module, *args)`` in place of ``module``'s own, on this instance only."""
    module.forward = types.MethodType(forward, module)


def attention_of(model: Any) -> str | None:
    """The attention implementation a transformers model dispatches to ("sdpa", "eager", ...)."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def can_switch_attention(model: Any) -> bool:
    """Whether ``model`` is a transformers model whose attention goes through ``AttentionInterface``."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and model._can_set_attn_implementation()


def register_attention(name: str, attention: Callable, mask_like: str = "sdpa") -> None:
    """Make ``name`` an attention implementation transformers can dispatch to, building its masks
    as ``mask_like`` does."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_like])


def set_attention(model: Any, name: str) -> None:
    """Switch ``model`` (and its sub-models) to the registered attention ``name``: transformers'
    public ``set_attn_implementation`` where it exists, else the config field it writes."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers before set_attn_implementation
        model.config._attn_implementation_internal = name


def bare_model(model: Any) -> Any:
    """The transformers model inside a peft wrapper (peft's public ``get_base_model``), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sdpa_attention():
    """transformers' own SDPA attention function, which a custom attention falls back to."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def tied_weight_keys(model: Any) -> set[str]:
    """Names of the parameters ``model`` ties to others (saved once); transformers keeps them in
    ``_tied_weights_keys``, a list in 4.x and a dict in 5.x."""
    keys = getattr(model, "_tied_weights_keys", None) or []
    return set(keys if isinstance(keys, (list, tuple, set)) else keys.keys())


# --- torch: private internals ------------------------------------------------------------------


def dispatch_mode() -> type:
    """torch's base class for a mode that sees every aten op (``__torch_dispatch__``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def tree_leaves(tree: Any) -> list:
    """The leaves of nested tuples, lists and dicts (an op's arguments or outputs), as torch walks them."""
    from torch.utils._pytree import tree_leaves as leaves

    return leaves(tree)


def tensor_version(t: Any) -> int:
    """How many in-place writes ``t``'s storage has had; autograd checks the same counter."""
    return t._version


def has_forward_hooks(module: Any) -> bool:
    """Whether anything hooks ``module``'s forward (before or after), which calling its weight
    directly would skip."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def cpu_flash_attention(q: Any, k: Any, v: Any, causal: bool, bias: Any = None, scale: float | None = None):
    """torch's CPU flash attention: ``(out, logsumexp)``, the row statistics the public
    ``scaled_dot_product_attention`` computes but does not return."""
    import torch

    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias,
                                                                            scale=scale)
    return out, lse


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX tiles (native bf16 matmul); False where torch cannot tell."""
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe and probe())
    except RuntimeError:
        return False


# --- transformers: GGUF -------------------------------------------------------------------------


def drop_gguf_quantizer(model: Any) -> None:
    """Make a model loaded from a GGUF file an ordinary one.

    transformers dequantizes GGUF weights to plain tensors (without its optional GGUF kernels)
    but leaves the model marked as quantized, and then refuses to save it: the first full
    fine-tune of the bundled model trained all its steps and failed at the end. The weights
    are ordinary tensors, so the quantizer's own clean-up makes the model ordinary too.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if not all(p.is_floating_point() for p in model.parameters()):
        model.dequantize()  # weights still in GGUF blocks (transformers' GGUF kernels installed)
    else:
        quantizer.remove_quantization_config(model)


# --- peft -----------------------------------------------------------------------------------------


QUANTIZED_FLAGS = {4: "is_loaded_in_4bit", 8: "is_loaded_in_8bit"}


def mark_quantized_base(model: Any, bits: int) -> None:
    """Flag ``model`` as loaded in ``bits`` bits, so that peft wraps its bitsandbytes layers with its
    bitsandbytes-aware adapter layers (it reads only this flag, which quantized loading sets)."""
    setattr(model, QUANTIZED_FLAGS[bits], True)


def unmark_quantized_base(model: Any) -> None:
    """Clear the flags once no bitsandbytes layer is left (a dequantized merge)."""
    for flag in QUANTIZED_FLAGS.values():
        if getattr(model, flag, False):
            setattr(model, flag, False)


def keep_peft_input_dtype(model: Any) -> None:
    """Stop peft casting each adapter's input to the adapter's dtype, for good on this model.

    peft's public ``disable_input_dtype_casting(model)`` flips the same per-layer switch for the
    length of a ``with`` block; a run keeps it off throughout, from apply to the end.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


# --- bitsandbytes ---------------------------------------------------------------------------------


def forget_meta_code_books() -> None:
    """bitsandbytes caches its code book on the device of the first tensor it quantizes: one
    made on the meta device (the memory estimator's) would break every later real quantization
    in this process."""
    functional = sys.modules.get("bitsandbytes.functional")
    cache = getattr(functional, "name2qmap", None)
    if isinstance(cache, dict):
        for key in [k for k, v in cache.items() if getattr(v, "is_meta", False)]:
            del cache[key]
