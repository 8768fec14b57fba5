"""Predict a run's peak memory from the model config and the spec, without loading weights.

The peak is the largest of three phases (bytes; the README's "Memory" section explains it):

  load   process + the base being read (a GGUF file is dequantized into new tensors)
  apply  process + the base + what the method makes from it (a quantized copy is built
         while the base it reads is still held)
  train  process + weights + trainable + gradients + optimizer state + activations
         + logits + allocator slack

``jobs.estimate.footprint`` supplies the counts (meta device) and the activations (a two-block
probe); this module turns them into bytes for the chosen update rule and device.
``jobs.training.memory`` says what is measured: the allocator's peak on a GPU, the training
process's peak resident memory on the CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

from adapters.base import RuleMemory, numel
from jobs.training import models
from jobs.training.allocator import preload_env
from jobs.estimate.footprint import (Batch, Counts, choice_for, count, dtype_for, first_batch, guess_saved,
                                     inference_activations, load_dtype, probe_saved, read_config,
                                     training_activations)
from jobs.estimate import sharding as engines
from jobs.spec import JobSpec, check_combination

# The training process before it touches a weight, measured on the CPU (Linux x86-64, Python
# 3.11, torch 2.13, transformers 5) as the resident memory of `bench/_run_one.py`'s processes.
PROCESS_BYTES = 370 << 20      # interpreter, torch, transformers, the studio's modules, model code
TOKENIZER_BYTES = 100 << 20    # a fast tokenizer with a ~50k vocabulary, and the tokenized rows
PEFT_BYTES = 45 << 20          # peft, and bitsandbytes which it imports
# glibc's malloc keeps memory a step frees and hands it out again only where the next tensor
# fits: batches differ in length, and some methods rebuild layers' weights in full precision in
# every forward and backward (a quantized layer dequantized, DoRA's combined weight). Two
# constants, fitted on the SmolLM2 ladder (bench/memory.py; 30 runs with repeats, every error
# within 9% with them, runs of one spec vary by up to 15%): of the activations whose size
# follows the batch, 0.45 stays resident beyond what the gradients take over; of the
# full-precision size of the weights rebuilt per forward, 0.4. Job processes that run on
# tcmalloc (jobs.training.allocator) reuse that memory: fitted the same way on the ladder, both
# constants come out at 0 (every error within 11%). jemalloc is taken to behave like tcmalloc.
CPU_SLACK = {"glibc": (0.45, 0.4), "preloaded": (0.0, 0.0)}
LOGIT_COPIES = 2               # one loss chunk's logits and their fp32 softmax, which becomes their gradient


def allocator_slack(basis: dict, coefficients: tuple[float, float]) -> int:
    """Bytes the CPU allocator keeps beyond what the train phase holds: of the batch-sized
    activations and logits (``churn``) what the gradients do not take over, and of the weights
    rebuilt in full precision per forward (``rebuilt``) a share (``CPU_SLACK``'s coefficients)."""
    activation_slack, rebuilt_slack = coefficients
    return max(0, int(activation_slack * basis["churn"]) - basis["gradients"]) + int(rebuilt_slack * basis["rebuilt"])


def rule_memory(rule, notes: list[str]) -> RuleMemory:
    """The rule's own declaration (``UpdateRule.memory``); AdamW's, said in the notes, when it has none."""
    if rule.memory is None:
        from adapters import UPDATE_RULES

        notes.append(f"update rule {rule.name!r} declares no memory use: counted like AdamW.")
        return UPDATE_RULES.get("adamw").memory
    return rule.memory


def estimate(spec: JobSpec, device: str | None = None, use_data: bool = True) -> dict:
    """Predicted peak memory of ``spec``'s run, per process, on ``device`` ("cpu" or "cuda";
    default: where the run would train). ``use_data=False`` assumes every row is max_seq_len long."""
    device = (device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    check_combination(spec)
    method, mcfg = spec.method_config()
    rule, rcfg = spec.optimizer_config()
    t = spec.training
    world = engines.world_size(t)
    sharded = t.sharding == "fsdp" and world > 1
    notes: list[str] = []
    src, config = read_config(spec)
    precision = choice_for(t.precision, device, src)
    dtype = precision.dtype
    # The file the run will load, read before count(), which builds the model and rewrites config.dtype.
    stored = models.stored_dtype(models.weights_for(src, load_dtype(method, dtype)).path) or _file_dtype(config)
    batch, tokenizer = first_batch(spec, src, use_data)
    counts = count(config, spec, method, mcfg, dtype)
    memory = rule_memory(rule, notes)
    act_bytes = torch.finfo(dtype).bits // 8
    largest = max((numel(s) for s in counts.trainable), default=0) * 4
    backward = memory.gradients != "none"

    if backward:
        try:
            saved = probe_saved(config, spec, method, mcfg, batch, tokenizer)
        except Exception as e:  # noqa: BLE001 - a model the probe cannot run still gets an estimate
            saved = guess_saved(config, batch)
            notes.append(f"activations from a rule of thumb: the probe could not run ({type(e).__name__}: {e}).")
        activations, fixed = (n * act_bytes // 4 for n in training_activations(saved, counts, batch,
                                                                                t.gradient_checkpointing))
        # Quantized layers are rebuilt too, also where a kernel does it out of the probe's sight.
        expanded = max(saved.expanded_per_block * counts.blocks, counts.replaced_bytes)
    else:
        activations, fixed = inference_activations(config, counts, batch, act_bytes), 0
        expanded = 0
    if dtype != torch.float32 and not sharded:
        # (Under FSDP2 the compute-dtype copy is the gathered parameters, counted per unit.)
        # Autocast casts each fp32 trained matrix to the compute dtype once per forward and keeps
        # the copy until the step ends (backward multiplies by it): full fine-tuning in bf16 holds
        # a bf16 copy of the model beside its fp32 masters (SmolLM2: 257 MiB).
        activations += counts.trainable_bytes * act_bytes // 4
    logits = min(t.loss_chunk_tokens, max(batch.trained, 1)) * counts.vocab * 4 * LOGIT_COPIES

    gradients = {"all": counts.trainable_bytes, "one": largest, "none": 0}[memory.gradients]
    if backward:
        gradients += counts.head_bytes  # a tied embedding's two gradients meet at the end of backward
    optimizer = memory.state_bytes(counts.trainable, rcfg) + memory.temporaries(largest)

    cpu = device == "cpu"
    all_gradients = gradients  # before a reusing malloc's overlap with activations is taken off
    # On the CPU a safetensors base in the dtype it trains in is memory-mapped: every page the run
    # reads stays resident for as long as one of its tensors is in use.
    in_file = cpu and src.kind in ("local", "bundled-cache", "hub")  # a safetensors base
    # FSDP2's ranks copy their shard out of the file, which is then closed.
    as_stored = stored in (None, load_dtype(method, dtype))
    mapped = in_file and as_stored and not sharded
    # Stored in another dtype, it is read through a mapping while it is converted: the whole file
    # is resident beside the converted weights until loading ends (SmolLM2's fp32 cache loaded
    # in bf16: 1.17 GB at the end of loading, 0.66 GB once the file is closed).
    converted = counts.base_bytes * torch.finfo(stored).bits // torch.finfo(load_dtype(method, dtype)).bits \
        if in_file and not as_stored else 0
    # A method that replaced base tensors (quantized layers) gets the rest copied off the file
    # after applying (jobs.training.memory.release_replaced_base), so only the apply phase holds the file.
    released = counts.replaced_bytes > 0
    # That copy is made while the file is still mapped: the mapping closes only when the last of
    # its tensors has been copied, so every copy sits beside the whole file (the quantization read
    # every page of the layers it replaced). The apply phase's peak: on Qwen2-0.5B, whose tied
    # 151936 x 896 embedding is 519 MiB in fp32, QLoRA peaked 510 MiB above the estimate without it.
    copied_off_file = counts.kept_base_bytes if mapped and released else 0
    weights = counts.base_bytes + counts.created_bytes - counts.trainable_base_bytes if mapped and not released \
        else counts.frozen_bytes
    process = PROCESS_BYTES + TOKENIZER_BYTES + (PEFT_BYTES if counts.uses_peft else 0) if cpu else 0
    slack, basis = 0, None
    if cpu:
        churn = activations - fixed + logits if backward else 0  # what changes size from batch to batch
        reusing = bool(preload_env())
        basis = {"churn": churn, "gradients": gradients, "rebuilt": expanded}
        if sharded:
            # FSDP2 gathers every unit's parameters and makes its unsharded gradients once per step,
            # freed unit by unit: churn for the malloc like a batch's activations; the gradients
            # that take some of it over are each rank's shard.
            basis["churn"] += engines.step_churn(counts.units, counts.blocks, act_bytes, backward)
            basis["gradients"] = engines.shard(gradients, world)
        slack = allocator_slack(basis, CPU_SLACK["preloaded" if reusing else "glibc"])
        if reusing and backward:
            # Backward frees each layer's activations as it makes that layer's gradients, and
            # tcmalloc hands the one to the other: the two peak apart (all activations at the end
            # of forward, all gradients, or LOMO's tied embedding's, at the end of backward).
            gradients -= min(gradients, activations)
    phases = {
        "train": {"weights": weights, "trainable": counts.trainable_bytes, "gradients": gradients,
                  "optimizer_state": optimizer, "activations": activations, "logits": logits,
                  "framework_overhead": process + slack},
        "apply": {"weights": counts.base_bytes + counts.created_bytes - counts.trainable_base_bytes + copied_off_file,
                  "trainable": counts.trainable_bytes, "framework_overhead": process},
        "load": {"weights": counts.base_bytes + _gguf_bytes(src) + converted, "framework_overhead": process},
    }
    in_place = models.read_in_place(src, load_dtype(method, dtype))
    phases = engines.per_rank(phases, counts.units, world=world, sharding=t.sharding,
                              trainable_bytes=counts.trainable_bytes, compute_bytes=act_bytes, backward=backward,
                              all_gradients=memory.gradients == "all", gradient_bytes=all_gradients, cpu=cpu,
                              read_in_place=in_place,
                              made_bytes=counts.trainable_bytes - counts.trainable_base_bytes + counts.created_bytes,
                              ddp_transient_bytes=2 * counts.head_bytes if counts.head_bytes else largest)
    peak = max(phases, key=lambda k: sum(phases[k].values()))
    breakdown = {k: int(phases[peak].get(k, 0)) for k in phases["train"]}
    total = sum(breakdown.values())
    notes += describe(spec, device, dtype, src, batch, counts, mapped, peak, method.name, rule.name)
    notes.append(f"computes in {str(dtype).removeprefix('torch.')}: {precision.reason}.")
    notes += engines.describe(world, t.devices, t.sharding, total, in_place)
    return {"total_bytes": total, "breakdown": breakdown, "device": device,
            "per": "rank", "world_size": world, "sharding": t.sharding,
            "node_bytes": total * t.devices,  # the ranks of one machine together (what a CPU's RAM holds)
            "dtype": str(dtype).removeprefix("torch."), "precision": precision.record(), "peak_phase": peak,
            "phases": {k: int(sum(v.values())) for k, v in phases.items()},
            "phase_breakdowns": {k: {part: int(v.get(part, 0)) for part in phases["train"]}
                                 for k, v in phases.items()},
            "batch": {"rows": batch.rows, "length": batch.length, "trained_positions": batch.trained,
                      "source": batch.source},
            "trainable_params": sum(map(numel, counts.trainable)), "method": method.name, "optimizer": rule.name,
            "details": {"process": process, "allocator_slack": slack, "activations_batch_sized": activations - fixed,
                        "activations_fixed": fixed, "weights_rebuilt_per_forward": expanded,
                        "slack_basis": basis},
            "assumptions": notes}


def estimate_inference(spec: JobSpec, device: str | None = None, use_data: bool = True) -> dict:
    """The floor the training estimates compare with: the base model in the compute dtype and the
    loss forward over the same first batch, without gradients (``bench/_run_one.py``'s inference run)."""
    from adapters import METHODS

    device = (device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    src, config = read_config(spec)
    dtype = dtype_for(spec.training.precision, device, src)
    batch, _ = first_batch(spec, src, use_data)
    full = METHODS.get("full")
    counts = count(config, spec, full, full.Config(), dtype)
    nbytes = torch.finfo(dtype).bits // 8
    base = counts.base_bytes * nbytes // 4  # the meta model is built in fp32 for "full"
    breakdown = {"weights": base, "trainable": 0, "gradients": 0, "optimizer_state": 0,
                 "activations": inference_activations(config, counts, batch, nbytes),
                 "logits": min(spec.training.loss_chunk_tokens, max(batch.trained, 1)) * counts.vocab * 4 * 2,
                 "framework_overhead": PROCESS_BYTES + TOKENIZER_BYTES if device == "cpu" else 0}
    return {"total_bytes": sum(breakdown.values()), "breakdown": breakdown, "device": device,
            "dtype": str(dtype).removeprefix("torch."), "batch": {"rows": batch.rows, "length": batch.length}}


def _file_dtype(config) -> torch.dtype | None:
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _gguf_bytes(src) -> int:
    # A GGUF file is read through a mapping while every tensor is dequantized into a new one.
    if src.gguf_file and src.kind in ("gguf", "bundled"):
        return (Path(src.path) / src.gguf_file).stat().st_size
    return 0


def describe(spec: JobSpec, device: str, dtype: torch.dtype, src, batch: Batch, counts: Counts, mapped: bool,
             peak: str, method: str, rule: str) -> list[str]:
    t = spec.training
    notes = [("CPU: the training process's peak resident memory, as run.json records it." if device == "cpu"
              else "GPU: the allocator's peak (tensors only; the CUDA context is not counted)."),
             f"first batch: {batch.rows} rows x {batch.length} tokens, {batch.trained} trained positions "
             f"({'from the dataset' if batch.source == 'dataset' else 'assumed: every row max_seq_len long'}).",
             f"{method} trains {sum(map(numel, counts.trainable)):,} values in {len(counts.trainable)} tensors; "
             f"{rule} updates them."]
    if mapped:
        notes.append("the base is memory-mapped from its safetensors file: every weight page the run reads "
                     "stays resident, also under a quantized copy.")
    if src.kind in ("gguf", "bundled"):
        notes.append("the base is a GGUF file: loading dequantizes it into new tensors "
                     "(the bundled model is converted once, later runs load the cached copy).")
    if t.gradient_checkpointing:
        notes.append("gradient checkpointing: each block keeps its input; one block is recomputed at a time.")
    if dtype != torch.float32:
        notes.append(f"activations in {str(dtype).removeprefix('torch.')}: the fp32 probe's bytes scaled down.")
    if peak in ("load", "apply"):
        notes.append(f"the peak falls in the {peak} phase, before the first step.")
    elif peak == "save":
        notes.append("the peak falls after training, when rank 0 puts the trained model together to save it.")
    return notes
