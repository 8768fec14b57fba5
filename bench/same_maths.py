"""Do the systems of the speed benchmark compute the same thing? Their loss on one batch, from one set of weights.

A speed ratio between two systems means something only if both do the same maths per step.
Before any ratio is reported, ``bench.speed`` runs this check once per row set, in one process
of its own (memory is not measured here): every leg of the round is built exactly as its
timed run builds it (``jobs.training.trainee.build_trainee`` for ours, ``bench.speed.build_trainer`` and
``build_trl`` for the anchors), then

- every trained tensor is set to the same known values, named by the tensor's name (peft
  gives every system the same names), so the adapters take part: a fresh LoRA adapter
  (B = 0) would make every system compute the base model's loss alone;
- each system computes its training loss, the way it trains (our chunked loss with its
  shared prefix; Trainer's and TRL's ``compute_loss`` on what their own collators make),
  on the same rows: the first batch of our loop's plan, with dropout off.

Their losses must agree with ours to ``TOLERANCE`` (relative), on the same rows; the worker
returns that verdict, and ``bench.speed.summarise`` refuses the ratio of any pair that does
not agree, or that could not be checked.
"""
from __future__ import annotations

import zlib

TOLERANCE = 1e-3  # relative; fp32 systems agree to ~1e-6, a loss over other positions differs by far more
# A low-precision suite is checked twice: the maths in fp32 at TOLERANCE, and each system's loss
# as it trains (under autocast) against that fp32 loss within this rounding bound, which bf16's
# 8 significant bits need: on SmolLM2 the three systems' bf16 losses agreed to 4e-7 with each
# other and lay 4.8e-3 from fp32 on the demo batch (2026-12-07, 2-core AMD EPYC, avx512_bf16).
ROUNDING_TOLERANCE = {"bfloat16": 2e-2, "float16": 5e-3}
# Large enough that the trained tensors move the loss by well over TOLERANCE (0.02 moved the tiny
# test model's by 4e-4 only, so an anchor that ignored its adapter would have passed).
KNOWN_STD = 0.1


def known_weights(model) -> int:
    """Set every trained tensor to values drawn from its own name (the same in every system that
    names it alike); returns how many values were set."""
    import torch

    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_((torch.randn(p.shape, generator=g) * KNOWN_STD).to(p.dtype))
                n += p.numel()
    return n


def reference_rows(data, batch_size: int, seed: int) -> list[int]:
    """The first micro-batch our loop trains on (jobs.training.recipe's plan, world size 1)."""
    from jobs.data.examples import plan_batches

    return plan_batches([len(e.input_ids) for e in data.train], batch_size, seed, 0)[0]


def _ours(spec_data: dict, scratch: str) -> dict:
    import torch

    from bench.common import compute_device, merge
    from jobs.data.examples import collate, prepare
    from jobs.spec import parse_spec
    from jobs.training import models
    from jobs.training.schedule import lr_at
    from jobs.training.trainee import build_trainee

    spec = parse_spec(merge(spec_data, {"output_dir": f"{scratch}/ours"}))
    device, dtype = compute_device(spec.training.precision)
    method, mcfg = spec.method_config()
    rule, rcfg = spec.optimizer_config()
    src = models.resolve(spec.model)
    tokenizer = models.load_tokenizer(src)
    data = prepare(spec.dataset, tokenizer, spec.training.max_seq_len, spec.training.seed)
    trainee = build_trainee(spec, method, mcfg, rule, rcfg, torch.device(device), getattr(torch, dtype), src,
                            tokenizer)
    rows = reference_rows(data, spec.training.batch_size, spec.training.seed)
    batch = {k: v.to(device) for k, v in collate([data.train[i] for i in rows], tokenizer.pad_token_id).items()}
    trained = int((batch["labels"][:, 1:] != -100).sum())
    trainee.model.eval()
    with torch.no_grad():
        fresh = float(trainee.loss_fn(trained)(batch))  # as the method starts (a fresh LoRA: the base's loss)
        known = known_weights(trainee.model)
        loss = float(trainee.loss_fn(trained)(batch))
    t = spec.training
    lrs = [lr_at(k, rcfg.lr, t.max_steps, t.warmup_steps, t.lr_schedule) for k in range(t.max_steps)]
    return {"loss": loss, "rows": rows, "trained_tokens": trained, "known_values": known, "lr_by_step": lrs,
            "loss_from_fresh_weights": fresh, "known_weights_move_loss": abs(loss - fresh) / max(abs(fresh), 1e-12)}


def _anchor(build, params: dict) -> dict:
    import torch

    built = build(params)
    s, trainer = built.setup, built.trainer
    rows = reference_rows(s.data, s.spec.training.batch_size, s.spec.training.seed)
    # The rows as the anchor holds them after its own preprocessing, collated by its own collator.
    batch = built.collator.inner([trainer.train_dataset[i] for i in rows])
    batch = {k: v.to(s.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    model = trainer.model
    known = known_weights(model)
    model.eval()
    # In training, accelerate wraps the model's forward in autocast (bf16=True); the model is not
    # prepared yet here, so the same autocast is entered around the loss (a no-op in fp32).
    with torch.no_grad(), trainer.accelerator.autocast():
        loss = float(trainer.compute_loss(model, batch))
    labels = batch.get("labels")
    trained = int((labels[:, 1:] != -100).sum()) if labels is not None else None
    # Not the maths of a step, but what a mean training loss also depends on: the rate each step uses.
    t = s.spec.training
    trainer.create_optimizer_and_scheduler(num_training_steps=t.max_steps)
    lrs = [s.rcfg.lr * trainer.lr_scheduler.lr_lambdas[0](k) for k in range(t.max_steps)]
    return {"loss": loss, "rows": rows, "trained_tokens": trained, "known_values": known, "lr_by_step": lrs}


def check(params: dict) -> dict:
    """Worker: each leg's loss on the reference batch; a leg that cannot be built records its error."""
    from bench.common import merge
    from bench.speed import build_trainer, build_trl

    out = {}
    for leg in params["legs"]:
        options = leg.get("options") or {}
        try:
            if leg["worker"] == "ours":
                out[leg["system"]] = _ours(merge(params["spec"], options.get("spec") or {}),
                                           f"{params['scratch']}/{leg['system']}")
            elif leg["worker"] in ("trainer", "trl"):
                build = build_trainer if leg["worker"] == "trainer" else build_trl
                out[leg["system"]] = _anchor(build, {"spec": params["spec"], "options": options,
                                                     "scratch": f"{params['scratch']}/{leg['system']}"})
            else:
                out[leg["system"]] = {"error": f"no same-maths check for the {leg['worker']} worker"}
        except Exception as e:  # noqa: BLE001 - recorded; the leg's ratios are then refused
            out[leg["system"]] = {"error": f"{type(e).__name__}: {e}"}
    return verdict({"systems": out}, params.get("tolerance", TOLERANCE))


def verdict(checked: dict, tolerance: float = TOLERANCE) -> dict:
    """Each system's loss against ours: its relative difference and whether it is within ``tolerance``."""
    systems = dict(checked.get("systems") or {})
    ours = systems.get("ours") or {}
    out = {"tolerance": tolerance, "reference": "ours", "systems": {}}
    for name, c in systems.items():
        if "error" in c or "loss" not in ours:
            why = c.get("error") or ours.get("error") or "our loss is missing"
            out["systems"][name] = {**c, "same": False, "why": f"not checked: {why}"}
            continue
        rel = abs(c["loss"] - ours["loss"]) / max(abs(ours["loss"]), 1e-12)
        same = rel <= tolerance and c.get("rows") == ours.get("rows")
        mine, theirs = ours.get("lr_by_step") or [], c.get("lr_by_step") or []
        differ = [k + 1 for k, (a, b) in enumerate(zip(mine, theirs)) if abs(a - b) > 1e-9 * max(abs(a), abs(b), 1e-30)]
        out["systems"][name] = {**c, "relative_difference": rel, "same": same,
                                "lr_differs_at_steps": differ if len(mine) == len(theirs) else "different lengths",
                                "why": None if same else (f"first-batch loss {c['loss']:.6g} against ours "
                                                          f"{ours['loss']:.6g}: {rel:.2e} relative, over "
                                                          f"{tolerance:g}")}
    if "error" in checked:
        out["error"] = checked["error"]
    return out


def with_rounding(exact: dict, low: dict, dtype: str) -> dict:
    """The fp32 verdict (``exact``) with each system's loss in ``dtype`` (``low``, as it trains)
    held against our fp32 loss: a system is the same only where both hold."""
    tolerance = ROUNDING_TOLERANCE[dtype]
    reference = ((exact.get("systems") or {}).get("ours") or {}).get("loss")
    out = {**exact, "rounding": {"dtype": dtype, "tolerance": tolerance, "reference": "ours in float32"}}
    systems = {}
    for name, c in (exact.get("systems") or {}).items():
        l = (low.get("systems") or {}).get(name) or {}
        if reference is None or "loss" not in l:
            why = l.get("why") or l.get("error") or "no loss"
            systems[name] = {**c, "same": False, "why": c.get("why") or f"not checked in {dtype}: {why}"}
            continue
        rel = abs(l["loss"] - reference) / max(abs(reference), 1e-12)
        close = rel <= tolerance
        systems[name] = {**c, f"loss_in_{dtype}": l["loss"], "rounding_difference": rel, "same": c["same"] and close,
                         "why": c.get("why") or (None if close else
                                                 f"{dtype} loss {l['loss']:.6g} against our fp32 {reference:.6g}: "
                                                 f"{rel:.2e} relative, over {tolerance:g}")}
    out["systems"] = systems
    if "error" in low:
        out["error"] = low["error"]
    return out


if __name__ == "__main__":
    from bench.common import worker_main

    worker_main({"check": check})
