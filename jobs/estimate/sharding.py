"""Each rank's share of a run under the chosen engine (``training.sharding``), from the one-process estimate.

World size is ``training.devices x training.nnodes``. Every rank trains on its own slice of the
global batch, so activations and logits are each rank's whole; what the engine changes is who
holds the model, its gradients and the update rule's state:

  none (DDP)  every rank holds all of it, and DDP's gradient buckets: about one more copy of the
              trainable gradients, which backward fills and the all-reduce reads.
  fsdp        FSDP2 (``fully_shard`` on each decoder block, then the root): every rank holds
              1/world of the weights, gradients and state; what it gathers for compute comes on
              top: the root's parameters (embeddings, output head, final norm), which FSDP2 keeps
              gathered from the start of forward to the end of backward, and its unsharded
              gradient, which backward makes first (the output head) and reduces last; and the
              largest block gathered twice (the one computing and the next one, prefetched), with
              its unsharded gradient and the fp32 copy the reduce-scatter reads.

The base is built on the meta device and each rank loads only its part (the engine's contract),
so the load and apply phases are shards too. A one-rank world is the one-process estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

DDP_BUCKET_COPIES = 1   # DDP's buckets: one more copy of the trainable gradients
PREFETCHED_BLOCKS = 2   # FSDP2 gathers the next block while the current one computes
REDUCE_BYTES = 4        # gradients are reduced in fp32 (the mixed-precision policy)


@dataclass
class Units:
    """What FSDP2 gathers, in elements (the caller knows the dtypes): the largest decoder block
    and the root (everything outside the blocks: embeddings, output head, final norm)."""

    block_numel: int = 0            # floating-point parameters of the largest block
    block_trainable_numel: int = 0  # of the block that trains the most, its trained values
    root_numel: int = 0
    root_trainable_numel: int = 0
    other_bytes: int = 0            # quantized storage of the largest block, gathered as held


def world_size(training) -> int:
    return training.devices * training.nnodes


def gathered_bytes(units: Units, compute_bytes: int, backward: bool) -> int:
    """Bytes an FSDP2 rank holds beyond its shards at the peak of a step."""
    root = units.root_numel * compute_bytes
    block = PREFETCHED_BLOCKS * (units.block_numel * compute_bytes + units.other_bytes)
    if backward:
        # An unsharded gradient in the compute dtype, and the fp32 buffer the reduce-scatter reads.
        grad = compute_bytes + REDUCE_BYTES
        root += units.root_trainable_numel * grad
        block += units.block_trainable_numel * grad
    return root + block


def shard(nbytes: int, world: int) -> int:
    return -(-int(nbytes) // world)  # rounded up: the first ranks hold the remainder


SHARDED_PARTS = ("weights", "trainable", "gradients", "optimizer_state")


def per_rank(phases: dict[str, dict[str, int]], units: Units, *, world: int, sharding: str, trainable_bytes: int,
             compute_bytes: int, backward: bool, all_gradients: bool) -> dict[str, dict[str, int]]:
    """The phases (load, apply, train: each a dict of parts in bytes) as one rank holds them.

    ``phases`` is the one-process estimate; ``trainable_bytes`` the trained tensors as held (the
    gradients DDP's buckets copy, when the rule keeps ``all_gradients``)."""
    if sharding not in ("none", "fsdp"):
        raise ValueError(f"unknown sharding {sharding!r}; expected none or fsdp")
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    out = {name: {**parts, "gathered": parts.get("gathered", 0)} for name, parts in phases.items()}
    if world == 1:
        return out
    if sharding == "none":
        if all_gradients and backward:
            out["train"]["gradients"] += DDP_BUCKET_COPIES * trainable_bytes
        return out
    for parts in out.values():
        for key in SHARDED_PARTS:
            if key in parts:
                parts[key] = shard(parts[key], world)
    out["train"]["gathered"] = gathered_bytes(units, compute_bytes, backward)
    return out


def describe(world: int, devices: int, sharding: str, per_rank_bytes: int) -> list[str]:
    """The notes the estimate adds about ranks (empty for one process)."""
    if world == 1:
        return []
    engine = ("DDP: every rank holds the whole model, its gradients and state, and gradient buckets "
              "(one more copy of the trainable gradients)" if sharding == "none" else
              "FSDP2: every rank holds 1/{w} of the weights, gradients and state, plus the gathered root "
              "(embeddings, head) and the largest block gathered twice (prefetch); the base is built on the "
              "meta device and each rank loads its part".format(w=world))
    notes = [f"per rank, {world} ranks ({devices} per machine): {engine}.",
             "the verdict is per device: each GPU must hold one rank's peak."]
    if devices > 1:
        notes.append(f"on the CPU the {devices} ranks of one machine share its RAM: together about "
                     f"{devices * per_rank_bytes / 2**30:.2f} GiB.")
    return notes
