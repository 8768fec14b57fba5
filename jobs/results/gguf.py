"""Export a run's merged model as one GGUF file for llama.cpp and Ollama, with a Modelfile beside it.

Written through the ``gguf`` package (llama.cpp's own Python library): tensor names from its
name map, the architecture's metadata keys, the byte-level BPE tokenizer with its merges,
special tokens and chat template. Llama and Qwen2 families only: their layouts are the ones
this writer knows (llama.cpp stores Llama's q/k rows interleaved per head, Qwen2's as they are).

After writing, the file is read back by transformers' GGUF loader (a reader we did not write)
and its logits are compared with the trained model's fingerprint and with the merged model's
on the run's own rows: the report gives the differences and top-1 agreements, and an export
past its type's bound (``BOUNDS``), or with a NaN anywhere, is refused (nothing is left behind).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jobs.training import fingerprint, models
from adapters.core.errors import StudioError
from jobs.results.export import logits_of, merge_checked, mergeable_method
from jobs.results.ollama import write_modelfile

import gguf

# name -> (tensor type for 2-D weights, llama.cpp's file type). Norms and biases stay f32, as
# llama.cpp's converter keeps them.
TYPES = {
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}


@dataclass(frozen=True)
class Bound:
    relative: float   # largest logit difference allowed, per unit of the largest logit
    top1: float       # least fraction of probe positions whose highest-logit token must agree
    why: str


# Each file is compared with the trained model's fingerprint (its logits on the run's own rows,
# recorded when training ended) and with the merged model on the export's probe rows; past its
# type's bound on either, or NaN anywhere, the export is refused and nothing is left behind.
# Measured (README, GGUF): SmolLM2-135M after a short LoRA run, and the tests' tiny random models.
BOUNDS = {
    # f16 and bf16 only round the weights (11 and 8 mantissa bits): more means a broken file.
    # Measured against the trained model: 6.8e-4 (f16) and 5.4e-3 (bf16) on SmolLM2 after bf16 QLoRA.
    "f16": Bound(0.01, 0.9, "f16 rounding of the weights alone stays within it"),
    "bf16": Bound(0.05, 0.8, "bf16 rounding of the weights alone stays within it"),
    # q8_0: 8-bit blocks of 32 with one f16 scale, lossy by choice: 0.03 after LoRA and 0.086 (top-1
    # 75% of the fingerprint's 16 positions) after QLoRA, whose NF4 base is rounded a second time.
    "q8_0": Bound(0.15, 0.5, "8-bit blocks cost SmolLM2 up to 9% of its largest logit, not more"),
    # q4_0 re-rounds everything to 4 bits: SmolLM2 kept 67% of its top-1 tokens after LoRA and 21%
    # after QLoRA (0.98 of the largest logit). Bounded loosely, to catch only a file that is no model
    # at all (chance agreement), and reported with a warning when it keeps fewer than half.
    "q4_0": Bound(1.5, 0.1, "a loose bound: 4-bit rounding of a small model is large, a broken file larger"),
}
# Below this top-1 agreement with the merged model the report warns that the file answers otherwise.
WARN_TOP1 = 0.5
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
# llama.cpp picks its pre-tokenizer (regex splitting) by this name.
DEFAULT_PRE = {"qwen2": "qwen2", "llama": "default"}


def architecture(config) -> gguf.MODEL_ARCH:
    kind = getattr(config, "model_type", None)
    if kind not in ARCHES:
        raise StudioError(f"GGUF export knows the Llama and Qwen2 families; this model is {kind!r}.", "model",
                          "export the merged safetensors model (--merged) and convert it with llama.cpp's "
                          "convert_hf_to_gguf.py, which covers more families.")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise StudioError(f"GGUF export does not write rope scaling {rope.get('rope_type')!r}.", "model",
                          "export --merged and convert with llama.cpp's convert_hf_to_gguf.py.")
    return ARCHES[kind]


def rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def interleave_heads(w: np.ndarray, n_head: int) -> np.ndarray:
    """Llama q/k rows from Hugging Face's rotate-half order to llama.cpp's pairwise order, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Tensors kept at 8 bits in a 4-bit file: the embedding (also the output layer when tied) and
# the output layer decide every logit, and llama.cpp's quantizer likewise gives them more bits.
KEEP_8BIT = ("token_embd.weight", "output.weight")


def encode_tensor(data: np.ndarray, gguf_type: str, name: str = "") -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    qtype, _ = TYPES[gguf_type]
    if qtype == gguf.GGMLQuantizationType.Q4_0 and name in KEEP_8BIT:
        qtype = gguf.GGMLQuantizationType.Q8_0
    if data.ndim < 2:
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), qtype
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.shape[-1] % block:
        # Rows that do not fill whole blocks cannot be quantized: llama.cpp falls back the same way.
        return data.astype(np.float16), gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def add_architecture(w: gguf.GGUFWriter, config, name: str, gguf_type: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    w.add_name(name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(TYPES[gguf_type][1])


def add_tensors(w: gguf.GGUFWriter, model, arch: gguf.MODEL_ARCH, gguf_type: str) -> dict[str, int]:
    """Every weight under its llama.cpp name; returns how many tensors went out in each type."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    counts: dict[str, int] = {}
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if "rotary_emb" in hf_name:
            continue  # computed, not learned
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise StudioError(f"the GGUF name map of {arch.name.lower()} has no tensor for {hf_name!r}.", "model",
                              "export --merged and convert it with llama.cpp's convert_hf_to_gguf.py.")
        data = tensor.detach().float().cpu().numpy()
        if arch == gguf.MODEL_ARCH.LLAMA and name.endswith(("attn_q.weight", "attn_k.weight")):
            data = interleave_heads(data, heads if "attn_q" in name else (kv_heads or heads))
        data, qtype = encode_tensor(data, gguf_type, name)
        w.add_tensor(name, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


def source_pre(spec) -> str | None:
    """The pre-tokenizer name in the base model's own GGUF, when it came as one (the bundled model)."""
    src = models.resolve(spec.model)
    path = Path(src.path) / src.gguf_file if src.gguf_file else models.bundled_gguf(spec.model)
    if path is None or not Path(path).is_file():
        return None
    field = gguf.GGUFReader(path).get_field(gguf.Keys.Tokenizer.PRE)
    return field.contents() if field is not None else None


def add_tokenizer(w: gguf.GGUFWriter, tokenizer, config, pre: str) -> None:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` model: tokens, types, merges, special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model = state.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (state.get("decoder") or {}).get("type") != "ByteLevel":
        raise StudioError("GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Qwen2, Llama 3); "
                          f"this one is {model.get('type', type(tokenizer).__name__)!r}.", "model",
                          "export --merged and convert it with llama.cpp's convert_hf_to_gguf.py.")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    special = set(tokenizer.all_special_ids)
    added = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    tokens, types = [], []
    for i in range(max(config.vocab_size, len(by_id))):
        if i not in by_id:  # the embedding is padded past the tokenizer: unused rows, as llama.cpp marks them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(tid)
    bos = tokenizer.bos_token_id
    w.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


def check_target(out: Path, gguf_type: str) -> None:
    if gguf_type not in TYPES:
        raise StudioError(f"unknown GGUF type {gguf_type!r}.", "--gguf-type", f"use one of: {', '.join(TYPES)}.")
    if out.suffix.lower() != ".gguf":
        raise StudioError("a GGUF file's name ends in .gguf.", str(out), "name the output like model.gguf.")
    if out.exists() or modelfile_path(out).exists():
        raise StudioError("the GGUF file or its Modelfile exists already.", str(out), "choose a new name.")


def modelfile_path(out: Path) -> Path:
    return out.with_suffix(".Modelfile")


def load_gguf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def measure(merged, path: Path, probes: list[torch.Tensor], trained: fingerprint.Fingerprint | None) -> dict:
    """Logits of the file as transformers reads it against the merged model's on the export's probe
    rows, and against the trained model's fingerprint (when there is one)."""
    model = load_gguf(path)
    vs_trained = None if trained is None else fingerprint.compare(trained, model)
    vs_merged = fingerprint.difference(logits_of(merged, probes), logits_of(model, probes))
    return {"vs_trained": vs_trained, "vs_merged": vs_merged}


def refuse_past(gguf_type: str, measured: dict, run_dir: Path) -> dict:
    """The report's figures; StudioError when either comparison is past the type's bound or not finite."""
    bound = BOUNDS[gguf_type]
    for against, diff in (("the trained model's fingerprint", measured["vs_trained"]),
                          ("the merged model", measured["vs_merged"])):
        if diff is None:
            continue
        if not diff.within(bound.relative):
            problem = f"the largest logit difference {diff.why(bound.relative, 'the ' + gguf_type + ' bound')}"
        elif not diff.top1_agreement >= bound.top1:
            problem = (f"its top token agrees at {diff.top1_agreement:.0%} of {diff.positions} positions, "
                       f"fewer than the {gguf_type} bound {bound.top1:.0%}")
        else:
            continue
        raise StudioError(f"the {gguf_type} GGUF file, read back, is not the model that trained: against {against}, "
                          f"{problem} ({bound.why}); nothing was written.", str(run_dir),
                          "export --merged instead and report this run: the GGUF writer mishandles this model.")
    merged, trained = measured["vs_merged"], measured["vs_trained"]
    report = {"max_abs_logit_diff": merged.max_abs, "max_abs_logit": merged.scale, "relative_diff": merged.relative,
              "top1_agreement": merged.top1_agreement, "bound_relative": bound.relative, "bound_top1": bound.top1}
    if merged.top1_agreement < WARN_TOP1:
        report["warning"] = (f"this {gguf_type} file picks the merged model's top token at only "
                             f"{merged.top1_agreement:.0%} of {merged.positions} positions: its answers will differ; "
                             "prefer q8_0 or f16 for a model this small")
    if trained is not None:
        report.update(max_abs_logit_diff_vs_trained=trained.max_abs, relative_diff_vs_trained=trained.relative,
                      top1_agreement_vs_trained=trained.top1_agreement, positions_vs_trained=trained.positions)
    return report


def refuse_early(run_dir: Path) -> None:
    """An unsupported family fails from the base model's config, before minutes of loading and merging."""
    from transformers import AutoConfig

    from jobs.results.inference import run_spec

    spec = run_spec(run_dir)
    src = models.resolve(spec.model)
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=spec.trust_remote_code, **src.kwargs())
    except Exception:
        return  # the full load below reports what is wrong with the model
    architecture(config)


def export_gguf(run_dir: str | Path, out: str | Path, gguf_type: str = "f16", no_fingerprint: bool = False) -> dict:
    run_dir, out = Path(run_dir), Path(out)
    check_target(out, gguf_type)
    mergeable_method(run_dir)
    refuse_early(run_dir)
    result = merge_checked(run_dir, no_fingerprint)  # refuses a missing fingerprint unless no_fingerprint
    trained = fingerprint.read(run_dir) if result.check.get("fingerprint_checked") else None
    model, loaded = result.model, result.loaded
    arch = architecture(model.config)
    pre = source_pre(loaded.spec) or DEFAULT_PRE[model.config.model_type]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".gguf", dir=out.parent)
    os.close(fd)
    tmp, modelfile = Path(tmp_name), None
    try:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        add_architecture(w, model.config, f"{Path(loaded.spec.output_dir).name} ({loaded.spec.method_name})",
                         gguf_type)
        add_tokenizer(w, loaded.tokenizer, model.config, pre)
        counts = add_tensors(w, model, arch, gguf_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        measured = refuse_past(gguf_type, measure(model, tmp, result.probes, trained), run_dir)
        modelfile = write_modelfile(modelfile_path(out), out.name, loaded.tokenizer)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if modelfile is not None:
            modelfile.unlink(missing_ok=True)
        raise
    return {"path": str(out), "gguf_type": gguf_type, "architecture": model.config.model_type,
            "tokenizer_pre": pre, "size_bytes": out.stat().st_size, "tensor_types": counts,
            "modelfile": str(modelfile) if modelfile else None, "merge": result.check,
            "fingerprint_checked": trained is not None,
            **({} if trained is not None else {"fingerprint": result.check.get("fingerprint")}), **measured}
