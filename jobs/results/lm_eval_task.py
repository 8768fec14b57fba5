"""EleutherAI's lm-eval harness on a run's model: its own held-out rows as a task, and named harness tasks.

``heldout`` is built from the run's held-out split, formatted exactly as training formatted
it (chat template or instruction layout), so it needs no network: greedy generation scored
by the harness's exact match. Named harness tasks (``hellaswag``, ``arc_easy``, ...) run where
their data is cached or the Hub is reachable; otherwise they are refused by name before the
model loads, never left to hang on a download.

Results go to ``<run>/eval/lm_eval.json`` (the harness's whole report) and, per task and
metric, under ``metrics.lm_eval`` in run.json, which the Compare tab shows.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from adapters.core.errors import StudioError
from jobs.runfolder import read_run, update_run, write_json_atomic

HELDOUT = "heldout"
EXTRA = "pip install -e '.[eval]'"


def _require_harness():
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise StudioError(f"lm-eval is not installed ({e}).", "studio evaluate",
                          f"install the eval extra: {EXTRA}") from None


def heldout_rows(loaded) -> list[dict]:
    """The run's held-out rows as (prompt text, target) with the prompt rendered as training rendered it."""
    from jobs.data.examples import encode, read_rows

    spec, tok = loaded.spec, loaded.tokenizer
    _, evals, fmt = read_rows(spec.dataset, spec.training.seed)
    examples = encode(evals, fmt, tok, spec.training.max_seq_len, spec.dataset.eval_path or spec.dataset.path)
    rows = [{"prompt": tok.decode(e.prompt_ids, skip_special_tokens=False), "target": e.target.strip()}
            for e in examples if e.prompt_ids and e.target is not None]
    if not rows:
        raise StudioError("the run has no held-out rows with a target to score.", spec.dataset.path,
                          "train with eval_fraction > 0 or an eval_path, or name harness tasks instead.")
    return rows


def heldout_task(rows: list[dict], folder: Path, tokenizer, max_new_tokens: int) -> dict:
    """An lm-eval task config over the rows, written as JSONL for the harness's json loader."""
    data = folder / "heldout.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    until = [t for t in dict.fromkeys([tokenizer.eos_token, tokenizer.pad_token]) if t]
    return {
        "task": HELDOUT, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test", "output_type": "generate_until",
        "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}", "target_delimiter": "",
        "generation_kwargs": {"until": until, "max_gen_toks": max_new_tokens, "do_sample": False},
        # The studio's own exact match compares stripped text; so does this.
        "filter_list": [{"name": "strip", "filter": [{"function": "regex", "regex_pattern": r"^\s*(.*?)\s*$"},
                                                     {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def check_named(names: list[str]):
    """Refuse unknown names, and known ones whose data is neither cached nor downloadable, before loading."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from jobs.training.models import hub_reachable

    if not hub_reachable():  # the datasets library would otherwise retry the Hub for minutes
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    manager = TaskManager()
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise StudioError(f"lm-eval has no task named {', '.join(unknown)}.", "--tasks",
                          f"use {HELDOUT} (the run's own held-out rows) or a name from `lm-eval ls tasks`.")
    for name in names:
        try:
            get_task_dict([name], manager)
        except Exception as e:
            reason = "is not in the local cache and the Hub is unreachable" if not hub_reachable() else \
                "could not be loaded"
            raise StudioError(f"the data of lm-eval task {name!r} {reason} "
                              f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}).", "--tasks",
                              f"run once where huggingface.co is reachable to cache it, or use {HELDOUT}.") from None
    return manager


def summarize(results: dict) -> dict[str, dict[str, float]]:
    """task -> metric -> value, without standard errors and filter suffixes."""
    out: dict[str, dict[str, float]] = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric = key.split(",")[0]
            if isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                out.setdefault(task, {})[metric] = float(value)
    return out


def evaluate_run(run_dir: str | Path, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    _require_harness()
    run_dir = Path(run_dir)
    if not tasks:
        raise StudioError("no tasks given.", "--tasks", f"name at least one, e.g. --tasks {HELDOUT}.")
    named = [t for t in dict.fromkeys(tasks) if t != HELDOUT]
    manager = check_named(named) if named else None
    from jobs.results.export import merge_checked
    from jobs.results.inference import load_run, run_spec

    method, _ = run_spec(run_dir).method_config()
    if method.merge_blocker:
        loaded, form = load_run(run_dir), "base+adapter"
        model = loaded.model
    else:
        merged = merge_checked(run_dir, require_fingerprint=False)  # scores, not a model: as the playground
        loaded, model, form = merged.loaded, merged.model, "merged"
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size,
              max_length=max(loaded.spec.training.max_seq_len, 512))
    with tempfile.TemporaryDirectory(prefix=".lm-eval-", dir=run_dir) as work:
        chosen: list = list(named)
        if HELDOUT in tasks:
            chosen.append(heldout_task(heldout_rows(loaded), Path(work), loaded.tokenizer,
                                       loaded.spec.training.max_new_tokens))
        results = lm_eval.simple_evaluate(model=lm, tasks=chosen, limit=limit, task_manager=manager,
                                          log_samples=False, bootstrap_iters=0, random_seed=loaded.spec.training.seed)
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    scores = summarize(results)
    report = {"tasks": list(scores), "model_form": form, "limit": limit, "scores": scores,
              "lm_eval_version": lm_eval.__version__, "results": results.get("results"),
              "configs": {k: {kk: vv for kk, vv in v.items() if kk != "dataset_kwargs"}
                          for k, v in (results.get("configs") or {}).items()}}
    write_json_atomic(run_dir / "eval" / "lm_eval.json", report)
    earlier = ((read_run(run_dir) or {}).get("metrics") or {}).get("lm_eval") or {}
    update_run(run_dir, metrics={"lm_eval": {**earlier, **scores}})
    return {"run_dir": str(run_dir), "report": str(run_dir / "eval" / "lm_eval.json"), "model_form": form,
            "scores": scores}
