"""The bake-off: which method suits this data on this machine, under one fair budget.

A bake-off lives in ``<home>/bakeoffs/<id>/``: ``bakeoff.json`` (the manifest: request,
plan, the jobs it queued, the learning rates it chose) and, at the end, the report
(``jobs.bakeoff.report``). Every training run is an ordinary job in the store, named
``bakeoff <id> ...``, so it shows in the Jobs tab and can be cancelled or resumed there.

Fairness, as a practitioner would set it up:
- every candidate trains the same optimizer steps (or, with a time budget, as many steps
  as its own measured step time allows in the same minutes);
- replicate k of every candidate uses the same ``training.seed``, which fixes the data
  order, so candidates see the same batches in the same order;
- every run trains on the same rows and the held-out rows are fixed once for all seeds
  (``jobs.bakeoff.split``): replicates differ only in initialisation and data order;
- each candidate gets its own learning rate from a short, bounded search: a few multiples
  of its suggested rate, each trained on a slice of the budget, the lowest loss on the
  search rows wins (rows that never score the candidates). A winner at the edge of the grid
  gets one more rate beyond that edge, once, and the report says where each rate landed.

This module holds the request, the plan and the choices; ``jobs.bakeoff.driver`` queues the
jobs and waits for them. Nothing here imports torch at module level: the UI writes requests
with ``create`` and starts the driver in a process of its own.
"""
from __future__ import annotations

import json
import math
import secrets
import time
from datetime import datetime
from pathlib import Path

from adapters.core.errors import StudioError, describe
from jobs.bakeoff.split import dataset_for, write_split
from jobs.home import studio_home
from jobs.runfolder import read_run, write_json_atomic
from jobs.runner.store import JobStore

MANIFEST = "bakeoff.json"
# Rules that trade quality or speed for memory; they only make sense on full fine-tuning,
# where optimizer state and gradients are what dominates memory.
MEMORY_RULES = ("lomo", "adalomo", "mezo", "adamw_8bit")
REFERENCE_RULE = "adamw"  # a method's suggested_lr is an AdamW rate (adapters/base.py)
# Three rates a factor ~3 apart bracket a good rate when the suggestion is within a decade.
LR_FACTORS = (0.3, 1.0, 3.0)
SEARCH_SHARE = 0.25   # a search run's share of the step budget
SEARCH_STEPS_TIMED = 10  # search steps under a time budget (they also measure the step time)


def bakeoffs_dir(home: Path) -> Path:
    return home / "bakeoffs"


def folder(home: str | Path | None, bid: str) -> Path:
    home = studio_home(home)
    path = (bakeoffs_dir(home) / str(bid)).resolve()
    if path.parent != bakeoffs_dir(home).resolve() or not (path / MANIFEST).is_file():
        raise StudioError(f"no bake-off {bid!r} in this studio home.", str(bakeoffs_dir(home)),
                          "pass an id that `studio bakeoff` printed (the folder name under bakeoffs/).")
    return path


def load(home: str | Path | None, bid: str) -> dict:
    return json.loads((folder(home, bid) / MANIFEST).read_text(encoding="utf-8"))


def save(home: str | Path | None, manifest: dict) -> None:
    write_json_atomic(bakeoffs_dir(studio_home(home)) / manifest["id"] / MANIFEST, manifest)


def list_bakeoffs(home: str | Path | None) -> list[dict]:
    """Every bake-off's manifest, newest first (damaged ones are left out)."""
    out = []
    for path in sorted(bakeoffs_dir(studio_home(home)).glob(f"*/{MANIFEST}"), reverse=True):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return out


def create(home: str | Path | None, spec: dict, *, methods: list[str] | None = None, rules: list[str] | None = None,
           budget_steps: int | None = None, budget_minutes: float | None = None, seeds: int = 2,
           lr_factors: tuple[float, ...] = LR_FACTORS, search_steps: int | None = None,
           memory_budget_bytes: int | None = None) -> dict:
    """Record a bake-off request; ``plan`` (in a process that may import torch) fills in the rest."""
    if budget_steps is not None and budget_minutes is not None:
        raise StudioError("both a step budget and a time budget were given.", "--budget-steps / --budget-minutes",
                          "give one of them.")
    if budget_steps is not None and budget_steps < 1 or budget_minutes is not None and budget_minutes <= 0:
        raise StudioError("the budget must be positive.", "--budget-steps / --budget-minutes", "give 1 step or more.")
    if seeds < 1:
        raise StudioError(f"--seeds {seeds}: at least one seed is needed (two give a noise floor).", "--seeds",
                          "use 2 or more.")
    if not lr_factors or any(not f > 0 for f in lr_factors):
        raise StudioError("learning-rate factors must be positive numbers.", "--lr-factors", "e.g. 0.3,1,3.")
    if not isinstance(spec, dict):
        raise StudioError("the base spec must be a mapping.", "spec", "start from the README's example spec.")
    home = studio_home(home)
    bid = f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    manifest = {"id": bid, "created_at": time.time(), "status": "planned", "error": None, "driver_pid": None,
                "spec": {k: v for k, v in spec.items() if k != "output_dir"},
                "request": {"methods": methods, "rules": rules, "budget_steps": budget_steps,
                            "budget_minutes": budget_minutes, "seeds": seeds, "lr_factors": list(lr_factors),
                            "search_steps": search_steps, "memory_budget_bytes": memory_budget_bytes},
                "candidates": [], "search": [], "final": []}
    save(home, manifest)
    return manifest


# -- planning (imports the registry and the estimator) ---------------------------------

def candidate_pairs(methods: list[str] | None, rules: list[str] | None) -> list[tuple[str, str]]:
    """Default: every method with AdamW, plus the memory-saving rules on full fine-tuning."""
    from adapters import METHODS, UPDATE_RULES

    for names, registry, flag in ((methods, METHODS, "--methods"), (rules, UPDATE_RULES, "--rules")):
        unknown = [n for n in names or [] if n not in registry]
        if unknown:
            raise StudioError(f"unknown {registry.kind}(s): {', '.join(unknown)}.", flag,
                              f"use some of: {', '.join(registry.names())}.")
    if not methods and not rules:
        pairs = [(m, REFERENCE_RULE) for m in METHODS.names()]
        return pairs + [("full", r) for r in MEMORY_RULES if r in UPDATE_RULES]
    return [(m, r) for m in (methods or METHODS.names()) for r in (rules or [REFERENCE_RULE])]


def suggested_lr(method, rule) -> float:
    """The centre of the search. A method declares an AdamW rate; rules that share AdamW's
    config (its 8-bit variants) scale like it, any other rule's own default rate is its
    suggestion (SGD-like LOMO, MeZO and AdaLomo live on other scales)."""
    from adapters import UPDATE_RULES

    if rule.Config is UPDATE_RULES.get(REFERENCE_RULE).Config:
        return float(method.suggested_lr)
    return float(rule.Config.model_fields["lr"].default)


def candidate_spec(base: dict, method: str, rule: str, lr: float, steps: int, seed: int, search: bool,
                   rows: dict | None = None) -> dict:
    """The base spec turned into one run of one candidate (the store picks the run folder);
    ``rows`` is the manifest's split (``jobs.bakeoff.split``), whose files the run reads."""
    data = json.loads(json.dumps({k: v for k, v in base.items() if k != "output_dir"}))
    data["dataset"] = dataset_for(data["dataset"], rows, search)
    own = data.get("method")
    if not (isinstance(own, dict) and own.get("name") == method or own == method):
        data["method"] = {"name": method}
    opt = data.get("optimizer")
    opt = dict(opt) if isinstance(opt, dict) and opt.get("name") == rule else {"name": rule}
    data["optimizer"] = {**opt, "lr": lr}
    t = data.setdefault("training", {})
    planned = t.get("max_steps") or steps
    t["warmup_steps"] = round(t.get("warmup_steps", 0) * min(steps / planned, 1.0))
    t.update({"max_steps": steps, "seed": seed, "save_every": 0})
    t.pop("epochs", None)
    if search:  # only the held-out loss decides: no generation, no mid-run evaluation
        t.update({"eval_every": 0, "exact_match_rows": 0, "eval_samples": 0})
    else:
        t["eval_every"] = min(t.get("eval_every", 0), steps) if t.get("eval_every") else 0
    return data


def device_capacity(device: str) -> int:
    import psutil
    import torch

    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory)
    return int(psutil.virtual_memory().available)


def plan(home: str | Path | None, manifest: dict) -> dict:
    """Fill in the candidates: validated, estimated, with their search grid, or skipped with why."""
    import torch

    from adapters import METHODS, UPDATE_RULES
    from jobs.estimate.estimator import estimate
    from jobs.spec import check_combination, parse_spec

    started = time.time()
    req = manifest["request"]
    base = manifest["spec"]
    parse_spec({**base, "output_dir": "<bake-off>"}, "base spec")  # a broken base fails once, clearly
    device = "cuda" if torch.cuda.is_available() else "cpu"
    capacity = device_capacity(device)
    seed0 = int((base.get("training") or {}).get("seed", 0))
    steps = req["budget_steps"] or (base.get("training") or {}).get("max_steps") or 100
    timed = req["budget_minutes"] is not None
    search_steps = req["search_steps"] or (SEARCH_STEPS_TIMED if timed else max(1, math.ceil(steps * SEARCH_SHARE)))
    rows = write_split(folder(home, manifest["id"]), base, seed0, searching=timed or len(req["lr_factors"]) > 1)
    candidates = []
    for mname, rname in candidate_pairs(req["methods"], req["rules"]):
        method, rule = METHODS.get(mname), UPDATE_RULES.get(rname)
        centre = suggested_lr(method, rule)
        cand = {"key": f"{mname}+{rname}", "method": mname, "rule": rname, "suggested_lr": centre,
                "lr_grid": [centre * f for f in req["lr_factors"]], "merges": method.merge_blocker is None,
                "merge_blocker": method.merge_blocker, "predicted_peak_bytes": None, "skipped": None,
                "lr": None, "lr_extra": None, "lr_landing": None, "steps": None if timed else steps}
        data = candidate_spec(base, mname, rname, centre, steps, seed0, search=False, rows=rows)
        try:
            spec = parse_spec({**data, "output_dir": "<bake-off>"}, cand["key"])
            check_combination(spec, cand["key"])
        except StudioError as e:
            cand["skipped"] = f"invalid combination: {e.message}"
            candidates.append(cand)
            continue
        try:
            cand["predicted_peak_bytes"] = int(estimate(spec, device)["total_bytes"])
        except Exception as e:  # noqa: BLE001 - a method the model does not support fails here
            cand["skipped"] = f"not supported here: {describe(e)}"
        else:
            if cand["predicted_peak_bytes"] > capacity:
                cand["skipped"] = (f"does not fit: predicted peak {cand['predicted_peak_bytes'] / 2**30:.2f} GiB, "
                                   f"{device} has {capacity / 2**30:.2f} GiB")
        candidates.append(cand)
    if not any(c["skipped"] is None for c in candidates):
        raise StudioError("no candidate can run here: " + "; ".join(f"{c['key']}: {c['skipped']}" for c in candidates),
                          "bake-off", "choose other methods or rules, or a smaller batch or model.")
    manifest.update(candidates=candidates, device=device, capacity_bytes=capacity, data=rows,
                    seeds=[seed0 + k for k in range(req["seeds"])], search_steps=search_steps,
                    memory_budget_bytes=req["memory_budget_bytes"] or capacity, plan_seconds=time.time() - started)
    save(home, manifest)
    return manifest


# -- the learning-rate choice -------------------------------------------------------

def searched_rates(cand: dict) -> list[float]:
    """The rates a candidate's search trains: its grid, and the one extension if it got one."""
    return list(cand["lr_grid"]) + ([cand["lr_extra"]] if cand.get("lr_extra") is not None else [])


def extend_grids(manifest: dict) -> list[str]:
    """A rate chosen at the edge of its grid is only the best of those tried: the optimum may lie
    beyond. Each such candidate gets one more rate past that edge, one grid step further (the
    ratio of the two rates at that end), once. Returns the candidates extended."""
    extended = []
    for cand in manifest["candidates"]:
        grid = sorted(cand["lr_grid"])
        if cand["skipped"] or cand["lr"] is None or cand.get("lr_extra") is not None or len(grid) < 2:
            continue
        if cand["lr"] == grid[0]:
            cand["lr_extra"] = grid[0] * grid[0] / grid[1]
        elif cand["lr"] == grid[-1]:
            cand["lr_extra"] = grid[-1] * grid[-1] / grid[-2]
        else:
            continue
        extended.append(cand["key"])
    return extended


def landing(cand: dict) -> str | None:
    """Where a chosen rate landed: ``interior`` (inside the planned grid), ``extended`` (at its
    edge, then bracketed by the extra rate, which lost), ``edge`` (the extra rate won, or could
    not be tried: the best rate may lie further out), ``single`` (one rate, nothing searched)."""
    if cand["skipped"] or cand["lr"] is None:
        return None
    grid = cand["lr_grid"]
    if len(grid) < 2:
        return "single"
    if cand.get("lr_extra") is not None:
        return "edge" if cand["lr"] == cand["lr_extra"] else "extended"
    return "interior" if min(grid) < cand["lr"] < max(grid) else "edge"


def settle_landings(home: Path, manifest: dict) -> None:
    for cand in manifest["candidates"]:
        cand["lr_landing"] = landing(cand)
    save(home, manifest)


def choose_rates(home: Path, manifest: dict) -> None:
    """Each candidate's rate: the lowest held-out loss among its search runs; timed budgets
    also turn the minutes into steps from the search runs' own step time."""
    store = JobStore(home)
    minutes = manifest["request"]["budget_minutes"]
    for cand in manifest["candidates"]:
        if cand["skipped"]:
            continue
        tried = [(s, _metrics(store, s["job_id"])) for s in manifest["search"] if s["key"] == cand["key"]]
        scored = [(m["eval_loss"], s["lr"]) for s, m in tried
                  if isinstance(m.get("eval_loss"), (int, float)) and math.isfinite(m["eval_loss"])]
        if tried and not scored:
            cand["skipped"] = "every learning rate of the search failed or diverged (see its search jobs)"
            continue
        cand["lr"] = min(scored)[1] if scored else cand["lr_grid"][0]
        if minutes is not None:
            secs = sum(m.get("train_seconds") or 0 for _, m in tried)
            done = sum(m.get("steps") or 0 for _, m in tried)
            per_step = secs / done if done and secs else None
            cand["seconds_per_step"] = per_step
            cand["steps"] = max(1, int(minutes * 60 / per_step)) if per_step else manifest["search_steps"]
    save(home, manifest)


def _metrics(store: JobStore, job_id: int) -> dict:
    try:
        run = read_run(store.get(job_id).run_dir) or {}
    except (StudioError, ValueError):
        return {}
    return run.get("metrics") or {}
