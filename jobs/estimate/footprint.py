"""What a model holds once a method is applied, and what autograd keeps for backward.

Both without the weights: parameter and quantized bytes come from the model built on the meta
device with the method applied there (exact, including which tensors train); activations come
from a two-block copy of the architecture with random weights, run once on the run's first
batch with the method applied, weighing every tensor autograd saves, block by block. The
first batch is the longest of the run: batches are grouped by length and the longest goes first.
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from dataclasses import dataclass, field

import torch

from adapters.core import compat
from adapters.core.errors import StudioError
from jobs.estimate.sharding import Units
from jobs.training.models import frozen_base_dtype
from jobs.spec import JobSpec

PROBE_BLOCKS = 2
# Small enough to build in milliseconds; the vocabulary only sizes embeddings, not activations.
PROBE_VOCAB = 1024


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def load_dtype(method, dtype: torch.dtype) -> torch.dtype:
    # As jobs.training.recipe: frozen bases load in the compute dtype, full fine-tuning keeps fp32 masters.
    return frozen_base_dtype(method, dtype)


@dataclass
class Batch:
    rows: int
    length: int
    trained: int       # positions whose next token is trained (what the loss projects)
    source: str
    shared: int = 0    # leading tokens every row of every batch has in common (jobs.training.prefix.shared_prefix)


@dataclass
class Counts:
    """Bytes and sizes of the model after the method is applied (from the meta device)."""

    base_bytes: int                 # the base as loaded
    frozen_bytes: int               # what the applied model holds that does not train
    created_bytes: int              # frozen tensors the method made (quantized copies)
    replaced_bytes: int = 0         # base tensors the method dropped (the layers it quantized)
    kept_base_bytes: int = 0        # base tensors the method kept frozen as they were (embeddings, norms)
    trainable: list[tuple[int, ...]] = field(default_factory=list)   # shape of every trained tensor
    trainable_bytes: int = 0
    trainable_base_bytes: int = 0   # of those, tensors of the base itself (full, selective)
    head_bytes: int = 0             # a trained output head tied to the input embedding
    trained_blocks: list[int] = field(default_factory=list)
    blocks: int = 0
    uses_peft: bool = False
    hidden: int = 0
    vocab: int = 0
    units: Units = field(default_factory=Units)  # what FSDP2 would gather (jobs.estimate.sharding)


def dtype_for(precision: str, device: str, src=None) -> torch.dtype:
    return choice_for(precision, device, src).dtype


def choice_for(precision: str, device: str, src=None):
    """The training loop's compute dtype and its reason (jobs.training.precision.Choice), at the
    model's shapes when ``src`` is given, as the loop picks it; a GPU that is not this machine's
    is assumed to have bf16."""
    from jobs.training.precision import Choice, choose_precision, source_shapes

    if precision == "auto" and device == "cuda" and not torch.cuda.is_available():
        return Choice(torch.bfloat16, "GPU assumed to support bf16")
    return choose_precision(precision, torch.device("cuda" if device == "cuda" else "cpu"),
                            source_shapes(src) if src is not None else None)


def read_config(spec: JobSpec):
    """The model's config from its folder, the bundled cache or a GGUF file's metadata."""
    from transformers import AutoConfig

    from jobs.training import models

    src = models.resolve(spec.model)
    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=spec.trust_remote_code, **src.kwargs())
    except (OSError, ValueError) as e:
        raise StudioError(f"could not read the model's config ({str(e).splitlines()[0]}).", spec.model,
                          "point model at a folder with config.json, a .gguf file, or a reachable Hub id.") from None
    return src, config


def first_batch(spec: JobSpec, src, use_data: bool = True) -> tuple[Batch, object]:
    """The shape of the first micro-batch a process trains on (the longest of the run)."""
    t = spec.training
    rows = t.batch_size
    if not use_data:
        return Batch(rows, t.max_seq_len, rows * t.max_seq_len, "max_seq_len"), None
    from jobs.training import models
    from jobs.data.examples import plan_batches, prepare

    tokenizer = models.load_tokenizer(src, spec.trust_remote_code)
    data = prepare(spec.dataset, tokenizer, t.max_seq_len, t.seed)
    lengths = [len(e.input_ids) for e in data.train]
    plan = [rows[::t.devices] for rows in plan_batches(lengths, t.batch_size * t.devices, t.seed, 0)]
    chosen = plan[0]
    trained = sum(data.train[i].trained for i in chosen)
    length = max(lengths[i] for i in chosen)
    shared = _shared_for_estimate(plan, data.train, lengths) if t.share_prefix else 0
    return Batch(len(chosen), length, trained, "dataset", shared), tokenizer


def _shared_for_estimate(plan: list[list[int]], examples: list, lengths: list[int]) -> int:
    """The prefix the estimate's batch (the plan's first) may count as computed once.

    A batch's activations grow with the tokens the model computes: rows x length, less
    (rows - 1) x the prefix the loss shares (jobs.training.prefix.shared_prefix), where it shares one. The first batch is the
    longest, but another may share less: its prefix, capped so that the first batch's count
    still covers every batch's, and none below the loss's minimum.
    """
    from jobs.data.examples import collate
    from jobs.training.prefix import SHARED_PREFIX_MIN, prefix_worth_sharing

    def shares(rows: list[int]) -> int:  # as the loss decides it for the collated batch
        batch = collate([examples[i] for i in rows], pad_id=0)
        return prefix_worth_sharing(batch["input_ids"], batch["attention_mask"])

    def computed(rows: list[int]) -> int:
        return len(rows) * max(lengths[i] for i in rows) - (len(rows) - 1) * shares(rows)

    first = plan[0]
    if len(first) < 2:
        return 0
    most = max(computed(rows) for rows in plan)
    room = (len(first) * max(lengths[i] for i in first) - most) // (len(first) - 1)
    shared = min(shares(first), max(room, 0))
    return shared if shared >= SHARED_PREFIX_MIN else 0


def _meta_model(config, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def _apply(method, mcfg, model, spec: JobSpec, device: torch.device, dtype: torch.dtype, tokenizer=None):
    from adapters.base import Context

    ctx = Context(spec=spec, device=device, dtype=dtype, tokenizer=tokenizer)
    try:
        return method.apply(model, mcfg, ctx)
    except StudioError:
        raise
    except Exception:
        # A method whose initialisation needs real numbers (an SVD, ...) may name a method of
        # the same memory shape to stand in for it on the meta device.
        twin = _stand_in(method, mcfg)
        if twin is None or device.type != "meta":
            raise
        return twin[0].apply(model, twin[1], ctx)
    finally:
        if device.type == "meta":
            compat.forget_meta_code_books()  # bitsandbytes cached a meta-device code book


def _stand_in(method, mcfg):
    from adapters import METHODS

    name = method.memory_twin  # a method that cannot be applied on the meta device names one that can
    if not name:
        return None
    twin = METHODS.get(name)
    fields = {k: v for k, v in mcfg.model_dump().items() if k in twin.Config.model_fields}
    return twin, twin.Config(**fields)


def count(config, spec: JobSpec, method, mcfg, dtype: torch.dtype) -> Counts:
    from adapters._blocks import find_blocks
    from adapters.quant.targets import held_bytes

    model = _meta_model(config, load_dtype(method, dtype), spec.trust_remote_code)
    base_ids = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    model = _apply(method, mcfg, model, spec, torch.device("meta"), dtype)
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}.values()
    trained = [t for t in tensors if t.requires_grad]
    trainable_bytes = sum(t.numel() * t.element_size() for t in trained)
    frozen = held_bytes(model) - trainable_bytes  # held_bytes also counts quantization state
    kept_base = sum(t.numel() * t.element_size() for t in tensors if id(t) in base_ids and not t.requires_grad)
    kept_trained = sum(t.numel() * t.element_size() for t in trained if id(t) in base_ids)
    blocks = find_blocks(model)
    trained_blocks = []
    if blocks is not None:
        trained_blocks = [i for i, b in enumerate(blocks.modules) if any(p.requires_grad for p in b.parameters())]
    text = _text(config)
    tied_and_trained = tied and head.weight.requires_grad
    return Counts(base_bytes=base_bytes, frozen_bytes=frozen, created_bytes=frozen - kept_base,
                  replaced_bytes=base_bytes - kept_base - kept_trained, kept_base_bytes=kept_base,
                  trainable=[tuple(t.shape) for t in trained], trainable_bytes=trainable_bytes,
                  trainable_base_bytes=kept_trained,
                  head_bytes=head.weight.numel() * head.weight.element_size() if tied_and_trained else 0,
                  trained_blocks=trained_blocks, blocks=len(blocks) if blocks is not None else 0,
                  uses_peft=any(type(m).__module__.startswith("peft") for m in model.modules()),
                  hidden=int(text.hidden_size), vocab=int(text.vocab_size),
                  units=_units(list(model.parameters()), blocks.modules if blocks is not None else []))


def _units(params: list, blocks) -> Units:
    """The largest block and the root (all that is outside the blocks), as FSDP2 would gather them."""
    from adapters.quant.targets import held_bytes

    def floats(tensors) -> list:
        return [p for p in {id(p): p for p in tensors}.values() if p.is_floating_point()]

    sizes = []
    for block in blocks:
        own = floats(block.parameters())
        numel = sum(p.numel() for p in own)
        other = held_bytes(block) - sum(p.numel() * p.element_size() for p in own)
        sizes.append((numel, other, sum(p.numel() for p in own if p.requires_grad)))
    everything = floats(params)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    root = [p for p in everything if id(p) not in in_blocks]
    largest = max(sizes, default=(0, 0, 0))
    return Units(block_numel=largest[0], other_bytes=largest[1],
                 block_trainable_numel=max((s[2] for s in sizes), default=0),
                 root_numel=sum(p.numel() for p in root),
                 root_trainable_numel=sum(p.numel() for p in root if p.requires_grad))


@dataclass
class Saved:
    per_block: int     # bytes one block keeps for backward
    outside: int       # embeddings, final norm, the loss's inputs
    upstream: bool     # the first block records though it trains nothing: something before it trains
    fixed_per_block: int = 0   # of per_block, bytes that do not grow with the batch's tokens
    fixed_outside: int = 0
    expanded_per_block: int = 0  # fp32 bytes of the weights a block rebuilds in full in every forward
    # Under gradient checkpointing (None: not probed): what one block's forward leaves alive when
    # the forward pass ends, and the part of it that does not grow with the batch's tokens.
    checkpointed_per_block: int | None = None
    fixed_checkpointed_per_block: int = 0


def _shrunk(config, blocks: int, vocab: int):
    small = copy.deepcopy(config)
    text = _text(small)
    text.num_hidden_layers = blocks
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:blocks]
    text.vocab_size = vocab
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value >= vocab:
            setattr(text, key, None)
    return small


def probe_saved(config, spec: JobSpec, method, mcfg, batch: Batch, tokenizer=None) -> Saved:
    """Run the method on a two-block random copy of the model and weigh what autograd keeps."""
    with torch.random.fork_rng(devices=[]):  # the caller's random stream stays as it was
        torch.manual_seed(0)
        return _probe(config, spec, method, mcfg, batch, tokenizer)


def _probe(config, spec: JobSpec, method, mcfg, batch: Batch, tokenizer) -> Saved:
    from transformers import AutoModelForCausalLM

    from adapters._blocks import find_blocks
    from jobs.training import fused
    from jobs.training.loss import token_loss_sum

    n_blocks = min(PROBE_BLOCKS, int(_text(config).num_hidden_layers))
    model = AutoModelForCausalLM.from_config(_shrunk(config, n_blocks, PROBE_VOCAB),
                                             trust_remote_code=spec.trust_remote_code)
    model.config.use_cache = False
    checkpointing = spec.training.gradient_checkpointing
    if checkpointing:  # as jobs.training.recipe does it, before the method is applied
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    plain = find_blocks(model)
    weight_shapes = [tuple(m.weight.shape) for m in plain.modules[-1].modules()
                     if isinstance(m, torch.nn.Linear)] if plain else []
    model = _apply(method, mcfg, model, spec, torch.device("cpu"), torch.float32, tokenizer)
    saved = fused.SavedOutputs() if spec.training.lean_activations else None
    if saved is not None:
        fused.install(model, saved)
    model.train()
    blocks = find_blocks(model)
    where = ["outside"]
    for i, block in enumerate(blocks.modules if blocks else []):
        block.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "outside"))
    held = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    # The blocks that checkpoint: off while the saved tensors are weighed, on for the checkpointed pass.
    switches = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]

    def shared(length: int) -> int:
        """The shared prefix at this probe length, in proportion, so that what grows with the tokens
        stays separate from what does not; none under checkpointing, where the loss shares nothing."""
        if checkpointing or not batch.shared:
            return 0
        return batch.shared * length // batch.length

    def checkpoint_blocks(on: bool) -> None:
        for m in switches:
            m.gradient_checkpointing = on

    def weigh(length: int, shapes: set) -> dict:
        """Bytes autograd keeps per place (block index or "outside") for a batch of this length;
        the shapes of every tensor the forward makes go into ``shapes``."""
        seen: list[tuple] = []

        def pack(t: torch.Tensor):
            seen.append((weakref.ref(t), where[0]))
            return t

        # The loss sees what the model keeps through saved.observing (its own hooks are innermost).
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), (saved.observing(pack) if saved else contextlib.nullcontext()), \
                _Shapes(shapes):
            loss, _ = token_loss_sum(model, _probe_batch(batch.rows, length, batch.trained, shared(length)),
                                     spec.training.loss_chunk_tokens, saved)
            # Only what is still alive when the forward ends: a side computation whose graph was
            # dropped (e.g. a detached weight norm) has already given its memory back.
            alive: dict[int, tuple] = {}
            for ref, place in seen:
                t = ref()
                if t is not None and t.untyped_storage().data_ptr() not in held:
                    alive.setdefault(t.untyped_storage().data_ptr(), (place, t.untyped_storage().nbytes()))
            del loss
        places: dict = {}
        for place, nbytes in alive.values():
            places[place] = places.get(place, 0) + nbytes
        return places

    def alive_when_forward_ends(length: int) -> dict:
        """Bytes of every tensor the forward made that is still alive when the last block returns,
        per place where it was made (the blocks checkpointing).

        Checkpointing keeps no saved tensor inside a block, so the saved-tensor hooks see nothing
        there; what stays is held by reference: each block's input (kept for the recomputation),
        and whatever else keeps a block's tensors alive until the forward ends. That is measured
        rather than assumed to be the input alone, because code inside the block can hold more by
        reference without autograd saving it: a rebuild recipe of the lean norms and MLP
        (jobs.training.fused) that kept its inputs (norm input, gate, up) alive would add them per
        block, and an estimate of one input per block would fall short by that much."""
        made: list[tuple] = []
        alive: dict[int, tuple] = {}

        def measure(module, args, output):
            for ref, place, ptr, nbytes in made:
                if ref() is not None and ptr not in held:
                    alive.setdefault(ptr, (place, nbytes))

        handle = blocks.modules[-1].register_forward_hook(measure)
        try:
            with _Made(made, where):
                loss, _ = token_loss_sum(model, _probe_batch(batch.rows, length, batch.trained, shared(length)),
                                         spec.training.loss_chunk_tokens, saved)
                del loss
        finally:
            handle.remove()
        places: dict = {}
        for place, nbytes in alive.values():
            places[place] = places.get(place, 0) + nbytes
        return places

    checkpoint_blocks(False)
    long_shapes: set = set()
    short_shapes: set = set()
    full = weigh(batch.length, long_shapes)
    # A second, shorter batch separates what grows with the tokens from what does not, which
    # matters for the CPU allocator's slack.
    half = weigh(max(1, batch.length // 2), short_shapes) if batch.length > 1 else full
    # A weight-shaped tensor made at both lengths: the method rebuilds that layer's weight in full
    # precision in every forward (DoRA's combined weight, a dequantized integer grid; bitsandbytes
    # does it inside its own kernels, out of sight: the caller adds what a method replaced).
    rebuilt = long_shapes & (short_shapes if batch.length > 1 else long_shapes)
    expanded = sum(4 * o * i for o, i in weight_shapes if (o, i) in rebuilt or (i, o) in rebuilt)
    last = n_blocks - 1
    first_trains = bool(blocks) and any(p.requires_grad for p in blocks.modules[0].parameters())

    def fixed(long: dict, short: dict, place) -> int:
        return max(0, min(long.get(place, 0), 2 * short.get(place, 0) - long.get(place, 0)))

    checkpointed, fixed_checkpointed = None, 0
    if checkpointing and switches and blocks:
        checkpoint_blocks(True)
        long_ckpt = alive_when_forward_ends(batch.length)
        short_ckpt = alive_when_forward_ends(max(1, batch.length // 2)) if batch.length > 1 else long_ckpt
        checkpointed = max(long_ckpt.get(last, 0), long_ckpt.get(0, 0))
        fixed_checkpointed = fixed(long_ckpt, short_ckpt, last)
    return Saved(per_block=max(full.get(last, 0), full.get(0, 0)), outside=full.get("outside", 0),
                 upstream=full.get(0, 0) > 0 and not first_trains,
                 fixed_per_block=fixed(full, half, last), fixed_outside=fixed(full, half, "outside"),
                 expanded_per_block=expanded, checkpointed_per_block=checkpointed,
                 fixed_checkpointed_per_block=fixed_checkpointed)


class _Made(compat.dispatch_mode()):
    """Notes every tensor an operation returns (a weak reference, its storage and bytes) with the
    place (block index or "outside") the forward is in."""

    def __init__(self, made: list, where: list):
        super().__init__()
        self.made, self.where = made, where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in compat.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.made.append((weakref.ref(t), self.where[0], storage.data_ptr(), storage.nbytes()))
        return out


class _Shapes(compat.dispatch_mode()):
    """Notes the shape of every new two-dimensional floating-point tensor an operation returns
    (not views of its inputs, such as a weight's transpose)."""

    def __init__(self, shapes: set):
        super().__init__()
        self.shapes = shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in compat.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in compat.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 2 \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.add(tuple(t.shape))
        return out


def _probe_batch(rows: int, length: int, trained: int, shared: int = 0) -> dict:
    """Random tokens, the first ``shared`` the same in every row; the trained positions spread
    over the rows, at their ends."""
    ids = torch.randint(0, PROBE_VOCAB, (rows, length))
    ids[:, :shared] = ids[:1, :shared]
    labels = torch.full((rows, length), -100)
    for r in range(rows):
        k = min(length - 1, trained // rows + (r < trained % rows))
        if k:
            labels[r, length - k:] = ids[r, length - k:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def guess_saved(config, batch: Batch) -> Saved:
    """Without a probe: a transformer block keeps ~10 hidden-sized and ~4 MLP-sized tensors per token."""
    text = _text(config)
    d = int(text.hidden_size)
    inner = int(getattr(text, "intermediate_size", None) or 4 * d)
    tokens = batch.rows * batch.length
    return Saved(per_block=tokens * (10 * d + 4 * inner) * 4, outside=2 * tokens * d * 4, upstream=True)


def training_activations(saved: Saved, counts: Counts, batch: Batch, checkpointing: bool) -> tuple[int, int]:
    """fp32 bytes autograd keeps at the end of the forward pass, and the part of them that does
    not grow with the batch's tokens.

    A block keeps tensors when it trains or when something before it trains (its input then
    needs a gradient); the blocks before the first trained one keep nothing.
    """
    first = min(counts.trained_blocks, default=counts.blocks)
    recording = counts.blocks if saved.upstream else counts.blocks - first
    if checkpointing and recording:
        # Each recording block keeps what the checkpointed probe found alive at the end of the
        # forward (without a probe: its input, rows x length x hidden), and backward recomputes
        # one block at a time with everything it saves.
        if saved.checkpointed_per_block is not None:
            kept, kept_fixed = saved.checkpointed_per_block, saved.fixed_checkpointed_per_block
        else:
            kept, kept_fixed = batch.rows * batch.length * counts.hidden * 4, 0
        total = saved.outside + recording * kept + saved.per_block
        return total, saved.fixed_outside + recording * kept_fixed + saved.fixed_per_block
    return (saved.outside + recording * saved.per_block,
            saved.fixed_outside + recording * saved.fixed_per_block)


def inference_activations(config, counts: Counts, batch: Batch, nbytes: int) -> int:
    """Without a graph (MeZO, evaluation) what stays is every block's output, which the loss asks
    for (output_hidden_states), and one block's MLP intermediates."""
    inner = int(getattr(_text(config), "intermediate_size", None) or 4 * counts.hidden)
    tokens = batch.rows * batch.length
    return (counts.blocks + 1) * tokens * counts.hidden * nbytes + 4 * tokens * inner * nbytes
