"""What a run trains, built as a job builds it: the base model loaded, the method applied, the
update rule made (step 2 of the recipe). The speed benchmarks build their models here too, so
they measure exactly what a job trains."""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Callable

import torch

from adapters.base import Context, decay_rule
from adapters.core.errors import StudioError
from jobs.spec import JobSpec, TrainingSpec
from jobs.training import distributed, fused, memory, models
from jobs.training.engines import Single, aliased_names
from jobs.training.loss import token_loss_sum


@dataclass
class Trainee:
    """The model with its method applied, the lean functions' shared state (None when
    ``training.lean_activations`` is off), the trained parameters, the update rule, and the
    run's training settings, device and compute dtype; the engine that shares it between
    processes and ``call``, the module the loss runs the forward through (the model itself, or
    DistributedDataParallel around it)."""
    model: torch.nn.Module
    lean: fused.SavedOutputs | None
    trainable: list[tuple[str, torch.nn.Parameter]]
    stepper: object
    training: TrainingSpec
    device: torch.device
    dtype: torch.dtype
    engine: Single | None = None
    call: torch.nn.Module | None = None
    lean_installed: dict[str, int] | None = None  # ``fused.install``'s counts on this process

    def autocast(self):
        """The context the model computes in: autocast to the compute dtype, none in fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def loss_fn(self, trained_tokens: int) -> Callable[[dict], torch.Tensor]:
        """A micro-batch's summed loss over ``trained_tokens``, the whole global step's count."""
        t = self.training

        def loss(batch: dict) -> torch.Tensor:
            if self.engine is not None:
                self.engine.before_forward()
            with self.autocast():
                total, _ = token_loss_sum(self.model, batch, t.loss_chunk_tokens, self.lean, t.share_prefix,
                                          self.call)
            if batch.get(FILLER):  # a process without rows this micro-batch still joins the collectives
                total = total * 0.0
            return total / max(trained_tokens, 1)
        return loss


# Key of a micro-batch that only stands in for a process's missing rows (its loss counts zero).
FILLER = "filler"


def build_trainee(spec: JobSpec, method, mcfg, rule, rcfg, device: torch.device, dtype: torch.dtype, src,
                  tokenizer, engine: Single | None = None) -> Trainee:
    """Frozen base weights may live in the compute dtype; trained weights stay fp32 (peft keeps
    adapters fp32; full fine-tuning keeps fp32 masters). ``engine``: how processes share the
    model (jobs/training/engines.py); None: one process."""
    t = spec.training
    engine = engine or Single(distributed.World(), device, dtype)
    base_dtype = models.frozen_base_dtype(method, dtype)
    built_on = engine.build_device(models.read_in_place(src, base_dtype))
    if built_on.type == "meta":  # the weights arrive from rank 0 once the model is sharded
        model = _meta_model(src, base_dtype, spec.trust_remote_code)
    else:
        model = models.load_model(src, base_dtype, spec.trust_remote_code, tokenizer).to(built_on)
    model.config.use_cache = False
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ctx = Context(spec=spec, device=built_on, dtype=dtype, tokenizer=tokenizer, gradient_sync=engine.gradient_sync,
                  all_reduce_sum=distributed.all_reduce_sum, decays=decay_rule(method))
    seed_everything(t.seed)
    loaded_bytes = memory.float_bytes(model)
    base = {id(t) for t in [*model.parameters(), *model.buffers()]}
    model = method.apply(model, mcfg, ctx)
    created = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in base]
    if built_on.type != "meta":
        model = model.to(built_on)
        if memory.float_bytes(model) < loaded_bytes:  # the method replaced (quantized) base tensors
            memory.release_replaced_base(model, built_on)
    # The lean functions (shared by the lean layers and the loss) recognise a norm by running it on
    # real numbers, which a model built on the meta device does not have: the engine decides where.
    lean = fused.SavedOutputs() if t.lean_activations else None
    installed = fused.install(model, lean, engine.lean_verdict(model)) if lean is not None else None
    model.train()
    call = engine.wrap(model, created)
    ctx.device = device
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise StudioError(f"method {method.name!r} left no parameter to train.", "method",
                          "check the method's target modules / patterns.")
    return Trainee(model, lean, trainable, rule.build(trainable, rcfg, ctx), t, device, dtype, engine,
                   None if call is model else call, installed)


def _meta_model(src, dtype: torch.dtype, trust_remote_code: bool) -> torch.nn.Module:
    """``src``'s modules without weights, as ``models.load_model`` would build them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs())
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def whole_model(spec: JobSpec, method, mcfg, src, dtype: torch.dtype, tokenizer, gathered: dict) -> torch.nn.Module:
    """The trained model, unsharded, on the CPU of rank 0: the modules rebuilt with the method
    applied, then given the gathered tensors (``Sharded.gathered_state``). What a sharded run saves
    and fingerprints, exactly as a single process would hold it.

    ``from_files``: the gathered tensors are only those training changed or the method made, and
    the frozen base is mapped from its files again, as every rank loaded it; else every tensor was
    gathered and the modules are built on the meta device."""
    base_dtype = models.frozen_base_dtype(method, dtype)
    from_files = gathered.get("from_files", False)
    if from_files:
        model = models.load_model(src, base_dtype, spec.trust_remote_code, tokenizer)
    else:
        model = _meta_model(src, base_dtype, spec.trust_remote_code)
    model.config.use_cache = False
    ctx = Context(spec=spec, device=torch.device("cpu" if from_files else "meta"), dtype=dtype, tokenizer=tokenizer,
                  decays=decay_rule(method))
    model = method.apply(model, mcfg, ctx)
    # A tensor reachable under two names (a tied input embedding and output head) is loaded once,
    # under its first name, and the second name pointed at it again: assigning both would leave
    # two tensors, and the saved model a second copy one process would not write.
    aliases = aliased_names(model)
    state = {k: v for k, v in gathered["state"].items() if k not in aliases}
    missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    if from_files:
        missing = []  # the frozen base is the files' own
    if set(missing) - set(aliases) or unexpected:
        raise RuntimeError(f"the gathered model does not fit its modules: missing {sorted(set(missing) - set(aliases))[:3]}, "
                           f"unexpected {unexpected[:3]}")
    for name, first in aliases.items():
        owner, _, leaf = name.rpartition(".")
        first_owner, _, first_leaf = first.rpartition(".")
        setattr(model.get_submodule(owner), leaf, getattr(model.get_submodule(first_owner), first_leaf))
    for name, buf in gathered["buffers"].items():  # buffers outside the state dict (rotary tables)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, buf)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise RuntimeError(f"the gathered model lacks tensors: {still_meta[:3]}")
    return model.eval()
