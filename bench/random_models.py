"""Models of real shapes with random weights, for memory and speed at sizes the bundled model is not.

Memory and time per step do not depend on what the weights have learned, so a model built
from a published architecture's config with random weights measures the same as the trained
one would. Each is written once, as an fp32 safetensors folder under ``bench/.home/models``
(not committed), with the bundled SmolLM2 tokenizer: its token ids all lie inside every
vocabulary here, and the rows then tokenize identically for every size.

    python -m bench.random_models qwen2-0.5b      # build one (prints its folder)
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bench.common import HOME

# Shapes as published in each model's config.json (hidden size, MLP width, layers, attention
# and key/value heads, vocabulary, tied embeddings, rotary base).
SHAPES = {
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True, "rope_theta": 100000.0, "max_position_embeddings": 8192,
                     "rms_norm_eps": 1e-5},
    "qwen2-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-6},
    "qwen2-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                   "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                   "tie_word_embeddings": True, "rope_theta": 1000000.0, "max_position_embeddings": 32768,
                   "rms_norm_eps": 1e-6},
}
FOLDER = HOME / "models"
STAMP = "random-weights.json"  # written last: a folder without it is an interrupted build


def parameters(name: str) -> int:
    """Parameter count of ``name``'s shape, from the config on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(name))
    return sum(p.numel() for p in model.parameters())


def _config(name: str):
    from transformers import AutoConfig

    shape = dict(SHAPES[name])
    return AutoConfig.for_model(shape.pop("model_type"), **shape)


def build(name: str, seed: int = 0) -> Path:
    """The folder of ``name``'s random-weight model, written on first use (atomically)."""
    if name not in SHAPES:
        raise KeyError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    folder = FOLDER / name
    if (folder / STAMP).is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM

    from jobs.training import models
    from jobs.spec import DEFAULT_MODEL

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    config = _config(name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp, safe_serialization=True)
    count = sum(p.numel() for p in model.parameters())
    del model
    models.load_tokenizer(models.resolve(DEFAULT_MODEL)).save_pretrained(tmp)
    (tmp / STAMP).write_text(json.dumps({"shape": name, "seed": seed, "parameters": count,
                                         "note": "random weights: for memory and speed only"}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(SHAPES):
        print(build(arg))
