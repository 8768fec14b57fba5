"""How the processes of a run share a model (``training.sharding``), on torch's own engines.

- ``Single``: one process, nothing to share.
- ``Replicated`` (``sharding: none`` with more than one process): every process loads the whole
  model and holds it inside torch's DistributedDataParallel, which reduces the trained tensors'
  gradients in buckets while backward still runs, once per step (no sync on all but the last
  micro-batch).
- ``Sharded`` (``sharding: fsdp``): FSDP2's ``fully_shard`` on each decoder layer, then on the
  root, so parameters, gradients and optimizer state are split across processes (ZeRO-3).

Scaling: the recipe divides each process's loss by the trained-token count of the whole global
step, so the update needs the SUM of the processes' gradients. DDP and FSDP2 average by default
(and gloo has no AVG: FSDP2 emulates it, pytorch #162338), so both engines are told to sum:
DDP through a comm hook, FSDP2 through a divide factor of 1 with sum-only collectives. The
equality with one process is tested (tests/test_distributed.py), not assumed.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch
import torch.distributed as dist

from adapters._blocks import find_blocks
from adapters.core.memory import HeapReturner
from adapters.core.errors import StudioError
from jobs.training import checkpoint, distributed, fused
from jobs.training.distributed import World


class Single:
    """One process: the model is called as it is, and gradients stay where backward left them."""
    name = "single"
    # Whether every process must take part in a forward (evaluation, fingerprint): a sharded
    # model computes nothing on one process alone.
    evaluates_everywhere = False
    # Whether every process loaded the same weights from the same files (``build_device``).
    every_rank_loads = False

    def __init__(self, world: World, device: torch.device, dtype: torch.dtype):
        self.world, self.device, self.dtype = world, device, dtype

    def build_device(self, read_in_place: bool = False) -> torch.device:
        """Where this process builds the base model before the method is applied. ``read_in_place``:
        whether loading maps the weights rather than copying them (``models.read_in_place``)."""
        self.every_rank_loads = read_in_place
        return self.device

    def lean_verdict(self, model: torch.nn.Module) -> dict[str, list[str]]:
        """Which of ``model``'s modules take the lean functions (``training.lean_activations``),
        decided where the weights are (``fused.recognise`` checks a norm on real numbers)."""
        return fused.recognise(model)

    def wrap(self, model: torch.nn.Module, created: list[str] = ()) -> torch.nn.Module:
        """Prepare the model (method applied) for training; returns what the loss calls.
        ``created``: the names of the tensors the method made (the base's own came from its files)."""
        return model

    def gradient_sync(self, last: bool) -> ContextManager:
        return contextlib.nullcontext()

    def before_forward(self) -> None:
        pass

    def save_checkpoint(self, run_dir, step: int, trainable: list, stepper, counters: dict, keep: int) -> None:
        """Every process calls this; rank 0 writes the trained tensors, which every replica holds."""
        if self.world.main:
            checkpoint.save(run_dir, step, dict(trainable), stepper.state_dict(), counters, keep=keep)
        distributed.barrier()

    def load_checkpoint(self, ckpt, trainable: list, stepper) -> dict:
        """Put the checkpoint's trained tensors and update-rule state in place; its counters."""
        saved, opt_state, state = checkpoint.load(ckpt)
        params = dict(trainable)
        missing = set(params) - set(saved)
        if missing:
            raise StudioError(f"checkpoint {ckpt.name} lacks trained tensors ({sorted(missing)[:3]}...).", str(ckpt),
                              "retry the job from scratch.")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name].to(p.dtype))
        stepper.load_state_dict(opt_state)
        return state

    def gathered_state(self) -> dict | None:
        """The whole model's state on rank 0 when the model is sharded; None: ``model`` is whole."""
        return None

    def close(self) -> None:
        """Let go of the wrapped model. DDP's reducer and FSDP2's state hold the process group, so
        while they live, destroying the group leaves it to interpreter exit, where gloo's threads
        still holding Python objects abort the process after a run that completed."""
        self.__dict__.pop("ddp", None)
        self.__dict__.pop("model", None)


def _torch_optimizer(stepper) -> torch.optim.Optimizer | None:
    """The torch optimizer inside an update rule's stepper, when it has one (AdamW, SGD)."""
    opt = getattr(stepper, "optimizer", None)
    return opt if isinstance(opt, torch.optim.Optimizer) else None


def _sum_hook(state, bucket):
    """DDP comm hook: the bucket's gradients summed over processes (DDP's own hook averages)."""
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class Replicated(Single):
    name = "none"

    def wrap(self, model: torch.nn.Module, created: list[str] = ()) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        # Every replica must start equal. Where every rank read the same files as they are, only
        # what the method made (drawn from a generator) is sent from rank 0, and DDP's own start-up
        # broadcast of the whole model is skipped; where loading converted, DDP sends it all.
        if self.every_rank_loads:
            send_from_rank0(model, created)
        # Only tensors that require grad get buckets; the frozen base is never communicated after that.
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True,
                                           broadcast_buffers=False, init_sync=not self.every_rank_loads)
        self.ddp.register_comm_hook(None, _sum_hook)
        return self.ddp

    def gradient_sync(self, last: bool) -> ContextManager:
        return contextlib.nullcontext() if last else self.ddp.no_sync()


class Sharded(Single):
    """FSDP2. No process holds the whole model on its device. Two ways in:

    - The weights are safetensors in the run's dtype (``models.read_in_place``): every rank loads
      the base on the CPU as views of the memory-mapped files, which read nothing yet, and applies
      the method; the tensors the method made (adapters, drawn from the seeded generator) are then
      made rank 0's on every rank, and ``fully_shard`` copies each rank's own rows out of the
      mapping. A rank reads its part of the files and no more, and the ranks exchange only what
      the method made.
    - Otherwise loading converts (another dtype, a GGUF file), and a conversion is a whole copy in
      each process that makes it: rank 0 alone loads and applies the method on the CPU, every other
      rank builds the same modules on the meta device, and after sharding each rank's part is sent
      from rank 0's copy (``set_model_state_dict`` with ``broadcast_from_rank0``), which is then
      dropped."""
    name = "fsdp"
    evaluates_everywhere = True

    def build_device(self, read_in_place: bool = False) -> torch.device:
        super().build_device(read_in_place)
        return torch.device("cpu") if self.world.main or read_in_place else torch.device("meta")

    def lean_verdict(self, model: torch.nn.Module) -> dict[str, list[str]]:
        """Rank 0's verdict, sent to every rank: a rank built on the meta device holds no weights a
        norm can be checked on, and every rank builds the same modules in the same order. Sent as
        numbers, one per module: 0 for none, else 1 + the kind's place in ``fused.LEAN_KINDS``."""
        names = [name for name, _ in model.named_modules()]
        codes = None
        if self.world.main:
            verdict, where = fused.recognise(model), {name: i for i, name in enumerate(names)}
            codes = [0.0] * len(names)
            for k, kind in enumerate(fused.LEAN_KINDS, 1):
                for name in verdict[kind]:
                    codes[where[name]] = float(k)
        codes = distributed.broadcast_floats(codes, len(names))
        return {kind: [n for n, c in zip(names, codes) if c == k] for k, kind in enumerate(fused.LEAN_KINDS, 1)}

    def wrap(self, model: torch.nn.Module, created: list[str] = ()) -> torch.nn.Module:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        blocks = find_blocks(model)
        if blocks is None:
            raise StudioError("sharding: fsdp shards a model by its decoder layers, and this model has no list of "
                              "layers the studio recognises.", "training.sharding", "use sharding: none.")
        # A module reachable under two names (peft's prompt-learning models keep the input
        # embedding as their ``word_embeddings`` too) is loaded once, under its first name: the
        # state-dict loader sends each shared tensor once and would leave the second copy whole.
        self.created = list(created)
        if self.every_rank_loads:
            # The base is the same files on every rank; what the method made is made rank 0's.
            send_from_rank0(model, created)
            full = buffers = None
        else:
            aliases = aliased_names(model)
            full = {k: v for k, v in model.state_dict().items() if k not in aliases} if self.world.main else {}
            buffers = {n: b.cpu() for n, b in model.named_buffers()} if self.world.main else None
        # Compute in the precision the run picked; gradients reduced (summed) in fp32.
        policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        for block in blocks.modules:
            fully_shard(block, mp_policy=policy)
        # The input embedding and the output head stay in the root, gathered from forward to the end
        # of backward. Grouped as a unit of their own (``fully_shard([embedding, head])``, torch
        # 2.13), a tied weight's one-step update came out half what one process makes, with either
        # reshard choice (tests/test_distributed.py); the loss also reads the head's weight itself
        # (jobs/training/loss.py), after the group's forward has ended.
        sparse_tied_embedding(model)
        fully_shard(model, mp_policy=policy)
        for module in [*blocks.modules, model]:  # each call sets one module's own group only
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
        if self.every_rank_loads:
            model.to(self.device)
        else:
            model.to_empty(device=self.device) if not self.world.main else model.to(self.device)
            # Not strict: the second names are absent on purpose; every other tensor is in ``full``,
            # which is rank 0's own state dict.
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                       strict=False))
            del full
            box = [buffers]
            dist.broadcast_object_list(box, src=0)  # buffers are not sharded: rotary tables and the like
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    buf.copy_(box[0][name])
        self.model = model
        return model

    def gradient_sync(self, last: bool) -> ContextManager:
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def before_forward(self) -> None:
        # FSDP2 keeps the root's parameters gathered after a forward for the backward that
        # follows; a forward without backward (MeZO, evaluation) would leave them gathered, and
        # the next forward would not see an update made to the shards since.
        if not torch.is_grad_enabled():
            self.model.reshard()


    def save_checkpoint(self, run_dir, step: int, trainable: list, stepper, counters: dict, keep: int) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        opt = _torch_optimizer(stepper)
        tensors = {"trainable": {n: p.detach() for n, p in trainable}}
        if opt is not None:
            tensors["optimizer"] = get_optimizer_state_dict(self.model, opt)
        else:  # a stepper without tensors (MeZO: its seed and step count), the same on every rank
            counters = {**counters, "stepper": stepper.state_dict()}
        checkpoint.save_sharded(run_dir, step, tensors, counters, keep, self.world.main)

    def load_checkpoint(self, ckpt, trainable: list, stepper) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        if not checkpoint.is_sharded(ckpt):
            raise StudioError(f"checkpoint {ckpt.name} was not written by a sharded run.", str(ckpt),
                              "resume with the spec that wrote it, or retry the job from scratch.")
        opt = _torch_optimizer(stepper)
        tensors = {"trainable": {n: p.detach() for n, p in trainable}}
        if opt is not None:
            tensors["optimizer"] = get_optimizer_state_dict(self.model, opt)  # the layout to read into
        state = checkpoint.load_sharded(ckpt, tensors)
        if opt is not None:
            set_optimizer_state_dict(self.model, opt, tensors["optimizer"])
        else:
            stepper.load_state_dict(state["stepper"])
        return state

    def gathered_state(self) -> dict | None:
        """Every process calls this; rank 0 receives the state on the CPU, the others nothing.

        Where every rank read the base from its files as they are (``every_rank_loads``), only the
        tensors training changed or the method made are gathered (``from_files``): rank 0 reads
        the rest from the same files again (``trainee.whole_model``). LoRA on Qwen2-1.5B gathered
        the whole 5.9 GiB base on rank 0 to keep 35 MB of adapters. Otherwise everything is.

        Tensor by tensor, in the state dict's order, each tensor's second names left out (whole_model
        points them at the first). On the CPU the malloc is told to give back what each all-gather
        freed every 256 MiB gathered: torch's ``get_model_state_dict`` left rank 0 holding 2.1 GiB
        of freed gather buffers beside Qwen2-1.5B's whole 5.9 GiB, in pieces too small to reuse."""
        from torch.distributed.tensor import DTensor

        # The root's parameters stay gathered after a forward without backward (the last evaluation):
        # freed first, or the whole state is gathered beside them (Qwen2-1.5B: a 934 MB embedding).
        self.model.reshard()
        returner = HeapReturner(self.device)
        returner.release()  # what training and evaluation freed, given back before the gather
        aliases = aliased_names(self.model)
        wanted = None
        if self.every_rank_loads:
            wanted = set(self.created) | {n for n, p in self.model.named_parameters() if p.requires_grad}
        full = {}
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                if name in aliases or (wanted is not None and name not in wanted):
                    continue
                whole = value.full_tensor() if isinstance(value, DTensor) else value
                if self.world.main:
                    full[name] = whole.detach().cpu()
                returner.freed(whole.numel() * whole.element_size())
                del whole
        buffers = {n: b.detach().cpu() for n, b in self.model.named_buffers()}
        return {"state": full, "buffers": buffers, "from_files": wanted is not None} if self.world.main else None


def send_from_rank0(model: torch.nn.Module, names: list[str]) -> None:
    """Make ``model``'s tensors called ``names`` rank 0's on every rank (what a method made from
    the generator: each machine may draw differently)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    distributed.broadcast_tensors([tensors[name] for name in names])


def sparse_tied_embedding(model: torch.nn.Module) -> bool:
    """Let a trained input embedding that shares its weight with the output head hand backward a
    sparse gradient (the rows of this batch's tokens); whether it does now.

    The head's dense gradient arrives first (the loss is the first thing backward runs) and the
    embedding's rows are added into it in place, so the weight's gradient is the same sum, dense.
    With the embedding's own dense gradient, backward's last step held three vocabulary-sized
    tensors at once under FSDP2 (the gathered weight, its gradient, and that one to add): on
    Qwen2-0.5B 545 MB more, beside every layer's sharded gradient. Not under DDP, which gives an
    embedding it sees as sparse a bucket of its own."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if (isinstance(emb, torch.nn.Embedding) and head is not None and emb.weight is getattr(head, "weight", None)
            and emb.weight.requires_grad and emb.max_norm is None):
        emb.sparse = True
        return True
    return False


def aliased_names(model: torch.nn.Module) -> dict[str, str]:
    """State-dict names of parameters and buffers that another name already reaches (the same
    tensor), each with that first name."""
    firsts: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(t) in firsts:
            aliases[name] = firsts[id(t)]
        else:
            firsts[id(t)] = name
    return aliases


def make_engine(sharding: str, world: World, device: torch.device, dtype: torch.dtype) -> Single:
    if sharding == "fsdp" and world.size > 1:
        return Sharded(world, device, dtype)
    if world.size > 1:
        return Replicated(world, device, dtype)
    return Single(world, device, dtype)
