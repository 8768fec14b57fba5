"""Each rank's share of a run under the chosen engine (``training.sharding``), from the one-process estimate.

World size is ``training.devices x training.nnodes``. Every rank trains on its own slice of the
global batch, so activations and logits are each rank's whole; what the engine changes is who
holds the model, its gradients and the update rule's state:

  none (DDP)  every rank holds all of it. DDP's gradient buckets are allocated when the model is
              wrapped and the gradients are views of them (jobs.training.engines:
              ``gradient_as_bucket_view``): no second copy, but neither can the gradients take
              over the memory backward frees from activations, as they do in one process on a
              reusing malloc (jobs.estimate.estimator). And each gradient is first made on its
              own, then copied into its bucket (the studio sets gradients to None between steps),
              so one more gradient is held beside the buckets (``ddp_transient_bytes``): the
              largest, or for a trained tied embedding, three vocabulary-sized tensors at the end
              of backward (the head's part, the embedding's, and their sum), two more than one
              process's estimate counts. Measured with the large tensors given back to the system
              at once (glibc, ``MALLOC_MMAP_THRESHOLD_=65536``), a 50000 x 1024 fp32 embedding on
              2 gloo ranks: backward rose 1.00x its size above the buckets untied, 2.94x tied.
  fsdp        FSDP2 (``fully_shard`` on each decoder block, then the root): every rank holds
              1/world of the weights, gradients and state; what it gathers for compute comes on
              top: the root's parameters (embeddings, output head, final norm), which FSDP2 keeps
              gathered from the start of forward to the end of backward, and its unsharded
              gradient, which backward makes first (the output head) and reduces last; and the
              largest block gathered twice (the one computing and the next one, prefetched), with
              its unsharded gradient and the fp32 copy the reduce-scatter reads. The activations
              are one process's, lean functions included (every rank installs them).

How FSDP2's ranks start (jobs.training.engines.Sharded), two ways:

- the weights are safetensors in the dtype the run loads (``read_in_place``): every rank maps the
  files, which reads nothing yet, and applies the method; sharding then copies each rank's rows
  out of the mapping. Every rank's load phase holds no weights, and its apply phase holds what the
  method made (``made_bytes``), its shard, and the pages of the files its shard was read from.
- otherwise rank 0 loads the whole base on the CPU and applies the method, the others build it on
  the meta device; after sharding, rank 0 still holds the whole state it sends from while it holds
  its own shard. Its load phase is the one-process load, its apply phase the one-process apply
  plus its shard.

Rank 0 is the rank whose peak counts (the verdict is per device). At the end, rank 0 puts the
trained model together on the CPU to save and fingerprint it: from files read in place it gathers
only the trained tensors and maps the frozen base again, otherwise it gathers everything. On the
CPU that is a phase of its own, ``save``.
A one-rank world is the one-process estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def step_churn(units: Units, blocks: int, compute_bytes: int, backward: bool) -> int:
    """Bytes an FSDP2 rank allocates and frees again in one step: every block's parameters gathered
    for forward (and again for backward), every trained unit's unsharded gradient and reduce buffer,
    and the root's gathering. The CPU's malloc keeps a share of it (jobs.estimate.estimator)."""
    block = units.block_numel * compute_bytes + units.other_bytes
    root = units.root_numel * compute_bytes
    if not backward:
        return blocks * block + root
    grad = compute_bytes + REDUCE_BYTES
    return blocks * (2 * block + units.block_trainable_numel * grad) + root + units.root_trainable_numel * grad


def shard(nbytes: int, world: int) -> int:
    return -(-int(nbytes) // world)  # rounded up: the first ranks hold the remainder


SHARDED_PARTS = ("weights", "trainable", "gradients", "optimizer_state")


def per_rank(phases: dict[str, dict[str, int]], units: Units, *, world: int, sharding: str, trainable_bytes: int,
             compute_bytes: int, backward: bool, all_gradients: bool, gradient_bytes: int | None = None,
             cpu: bool = False, read_in_place: bool = False, made_bytes: int = 0,
             ddp_transient_bytes: int = 0) -> dict[str, dict[str, int]]:
    """The phases (load, apply, train: each a dict of parts in bytes) as the rank that holds the
    most (rank 0) holds them.

    ``phases`` is the one-process estimate; ``trainable_bytes`` the trained tensors as held;
    ``gradient_bytes`` every gradient the rule keeps, before the reusing malloc's overlap with
    activations was taken off (default: the train phase's gradients); ``cpu``: the run is on the
    CPU, where FSDP2's final gather lands in the same memory; ``read_in_place``: every rank maps the
    base's files (see above), and ``made_bytes`` are the tensors the method made, whole on each rank
    until sharding; ``ddp_transient_bytes``: what a DDP rank's backward holds beside its buckets
    (see above)."""
    if sharding not in ("none", "fsdp"):
        raise ValueError(f"unknown sharding {sharding!r}; expected none or fsdp")
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    out = {name: {**parts, "gathered": parts.get("gathered", 0)} for name, parts in phases.items()}
    if world == 1:
        return out
    gradients = phases["train"]["gradients"] if gradient_bytes is None else gradient_bytes
    if sharding == "none":
        if all_gradients and backward:  # held from the wrap on, in buckets
            out["train"]["gradients"] = gradients + ddp_transient_bytes
        return out
    train = out["train"]
    train["gradients"] = gradients  # sharded below; not counted as reusing freed activations (not measured so)
    for key in SHARDED_PARTS:
        train[key] = shard(train[key], world)
    train["gathered"] = gathered_bytes(units, compute_bytes, backward)
    apply = out["apply"]
    own = shard(apply.get("weights", 0) + apply.get("trainable", 0), world)
    apply["gathered"] = own  # its own shard
    if read_in_place:
        out["load"]["weights"] = 0
        apply["weights"], apply["trainable"] = own, made_bytes  # the rows it read; the method's tensors
    if cpu:
        out["save"] = _save_phase(phases["train"], train, read_in_place)
    return out


def _save_phase(one: dict[str, int], train: dict[str, int], read_in_place: bool) -> dict[str, int]:
    """Rank 0 at the end on the CPU (``Recipe.finish``): the optimizer's state is let go, and the
    gather comes on top of the rank's shards. From files read in place only the trained tensors are
    gathered; the shards are then let go and rank 0 maps the base's files again beside them, which
    is the larger of the two for any base much bigger than its trained part."""
    zero = {k: 0 for k in ("gradients", "activations", "logits", "optimizer_state")}
    weights, trainable = one.get("weights", 0), one.get("trainable", 0)
    shards = {k: train[k] for k in ("weights", "trainable", "framework_overhead")}
    if not read_in_place:
        return {**zero, **shards, "gathered": weights + trainable}
    gather = {**zero, **shards, "gathered": trainable}
    rebuilt = {**zero, "weights": weights, "trainable": trainable, "framework_overhead": train["framework_overhead"],
               "gathered": 0}
    return max(gather, rebuilt, key=lambda parts: sum(parts.values()))


def describe(world: int, devices: int, sharding: str, per_rank_bytes: int, read_in_place: bool = False) -> list[str]:
    """The notes the estimate adds about ranks (empty for one process)."""
    if world == 1:
        return []
    engine = ("DDP: every rank holds the whole model, its gradients (in DDP's buckets, allocated up front) "
              "and state" if sharding == "none" else
              "FSDP2: every rank holds 1/{w} of the weights, gradients and state, plus the gathered root "
              "(embeddings, head) and the largest block gathered twice (prefetch); {start}".format(
                  w=world, start="each rank reads its own part of the base's files" if read_in_place else
                  "rank 0 loads the whole base on the CPU and sends the other ranks their shards"))
    notes = [f"per rank, {world} ranks ({devices} per machine): {engine}.",
             "the verdict is per device: each GPU must hold one rank's peak."]
    if devices > 1:
        notes.append(f"on the CPU the {devices} ranks of one machine share its RAM: together about "
                     f"{devices * per_rank_bytes / 2**30:.2f} GiB.")
    return notes
