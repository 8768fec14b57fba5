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
from jobs.training.loss import token_loss_sum


@dataclass
class Trainee:
    """The model with its method applied, the lean functions' shared state (None when
    ``training.lean_activations`` is off), the trained parameters, the update rule, and the
    run's training settings, device and compute dtype."""
    model: torch.nn.Module
    lean: fused.SavedOutputs | None
    trainable: list[tuple[str, torch.nn.Parameter]]
    stepper: object
    training: TrainingSpec
    device: torch.device
    dtype: torch.dtype

    def autocast(self):
        """The context the model computes in: autocast to the compute dtype, none in fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def loss_fn(self, trained_tokens: int) -> Callable[[dict], torch.Tensor]:
        """A micro-batch's summed loss over ``trained_tokens``, the whole global step's count."""
        t = self.training

        def loss(batch: dict) -> torch.Tensor:
            with self.autocast():
                total, _ = token_loss_sum(self.model, batch, t.loss_chunk_tokens, self.lean, t.share_prefix)
            return total / max(trained_tokens, 1)
        return loss


def build_trainee(spec: JobSpec, method, mcfg, rule, rcfg, device: torch.device, dtype: torch.dtype, src,
                  tokenizer) -> Trainee:
    """Frozen base weights may live in the compute dtype; trained weights stay fp32 (peft keeps
    adapters fp32; full fine-tuning keeps fp32 masters)."""
    t = spec.training
    model = models.load_model(src, models.frozen_base_dtype(method, dtype), spec.trust_remote_code,
                              tokenizer).to(device)
    model.config.use_cache = False
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ctx = Context(spec=spec, device=device, dtype=dtype, tokenizer=tokenizer,
                  all_reduce_grads=distributed.sum_grads, all_reduce_mean=distributed.all_reduce_mean,
                  decays=decay_rule(method))
    seed_everything(t.seed)
    loaded_bytes = memory.float_bytes(model)
    model = method.apply(model, mcfg, ctx).to(device)
    if memory.float_bytes(model) < loaded_bytes:  # the method replaced (quantized) base tensors
        memory.release_replaced_base(model, device)
    lean = fused.SavedOutputs() if t.lean_activations else None  # shared by the lean layers and the loss
    if lean is not None:
        fused.install(model, lean)
    model.train()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise StudioError(f"method {method.name!r} left no parameter to train.", "method",
                          "check the method's target modules / patterns.")
    return Trainee(model, lean, trainable, rule.build(trainable, rcfg, ctx), t, device, dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
