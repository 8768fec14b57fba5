"""Submitting, retrying and deleting jobs: what the CLI and the UI ask of the store, with its rules.

A job is checked before anything is stored: its spec validates (in this process or, for the
web server, in its model process), and under a confined ``Policy`` everything it names lies
where the caller may act (``jobs.confine``). A run folder belongs to one job: a submit that
names another job's folder is refused, and a delete removes only folders the studio marked
as this job's, and only the files it wrote there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from adapters.core.errors import StudioError
from jobs.confine import Policy, check_devices
from jobs.home import studio_home
from jobs.runner.store import Job, JobStore, Status


def submit_job(home: str | Path | None, data: dict, *, name: str | None = None, priority: int = 0,
               devices: int | None = None, where: str = "spec", base_dir: str | Path | None = None,
               policy: Policy | None = None, validate: Callable[[dict, str], dict] | None = None) -> Job:
    """Validate a spec (nothing is stored when it is wrong) and queue it.

    ``policy`` says what the caller may name (``jobs.confine``): the command line passes
    none (anything), the web server a confined one. ``validate(data, where)`` returns the
    resolved spec; the web process passes one that asks its model process, since validating
    imports the methods (and torch). Relative paths in the spec are taken from ``base_dir``
    (the caller's folder), since the job runs elsewhere. Without ``output_dir`` the run goes
    to ``<home>/runs/<id>``.
    """
    home = studio_home(home)
    policy = policy or Policy.open(home)
    data = json.loads(json.dumps(data or {}))
    named_dir = data.get("output_dir")
    if devices is not None:
        data.setdefault("training", {})["devices"] = devices
    # The real folder is known once the store assigns an id; validate with a stand-in.
    resolved = (validate or _validate_here)({**data, "output_dir": named_dir or "<home>/runs/<id>"}, where)
    check_devices(resolved["training"]["devices"], f"{where}: training.devices")
    if policy.confined:
        resolved = policy.check_spec(resolved, output_dir_given=bool(named_dir), where=where)
        run_dir = resolved["output_dir"] if named_dir else None
    else:
        from jobs.spec import relative_to

        base = Path(base_dir or os.getcwd())
        resolved = relative_to(resolved, base)
        if (base / resolved["model"]).exists():
            resolved["model"] = str((base / resolved["model"]).resolve())
        run_dir = str(base / named_dir) if named_dir else None
    store = JobStore(home)
    if run_dir:
        _refuse_shared_folder(store, run_dir, None, where)
    name = name or f"{resolved['method']['name']}-{Path(resolved['model']).name}"
    return store.submit(resolved, name=name, priority=priority, nprocs=resolved["training"]["devices"],
                        run_dir=run_dir)


def _validate_here(data: dict, where: str) -> dict:
    from jobs.spec import check_combination, parse_spec

    spec = parse_spec(data, where)
    check_combination(spec, where)
    return spec.resolved()


def retry_job(home: str | Path | None, job_id: int | str, *, policy: Policy | None = None) -> Job:
    """Queue a finished job again from scratch; the new attempt's folder is ``<first folder>-attempt<N>``.

    Under a confined ``policy`` (the web server) that folder must lie where the server may act
    (``Policy.holds_run``), checked before the store changes: a run folder that is the home itself
    or an --allow-path folder would otherwise get its next attempt beside it, outside."""
    home = studio_home(home)
    policy = policy or Policy.open(home)

    def check(folder: str) -> None:
        if not policy.holds_run(folder):
            raise StudioError(f"retrying job {job_id} would make its new run folder {folder} outside the studio home.",
                              f"job {job_id}", f"retry it on this machine's command line: studio jobs retry {job_id} "
                              f"--home {home}; or launch its spec again from the web.")

    return JobStore(home).retry(job_id, check=check)


def delete_job(home: str | Path | None, job_id: int | str, *, files: bool = False) -> list[str]:
    """Remove a job from the store; with ``files``, its run folders too. Returns what was removed.

    Only folders the studio made for this job (their marker says so) lose anything, and
    only the files the studio wrote there; a folder that is not the studio's, or that
    another job also uses, is refused before the job is removed.
    """
    from jobs.runfolder import is_run_entry, remove_marked_folder

    store = JobStore(home)
    job = store.get(job_id)
    folders = [Path(f) for f in dict.fromkeys([*job.earlier_run_dirs, job.run_dir])]
    if files:
        if job.status == Status.RUNNING:
            raise StudioError(f"job {job.id} is running.", f"job {job.id}", "cancel it first, then delete it.")
        for folder in folders:
            _refuse_shared_folder(store, str(folder), job.id, f"job {job.id}")
            if (folder.exists() or folder.is_symlink()) and not _ours(folder, job.id):
                raise StudioError(f"the run folder {folder} was not made by this studio for job {job.id} "
                                  "(it has no studio marker, or is a symlink).", f"job {job.id}",
                                  "delete the job without its files, and remove the folder by hand if you mean to.")
    job = store.delete(job.id)
    removed = []
    if files:
        for folder in folders:
            removed += remove_marked_folder(folder, {"job": job.id}, is_run_entry)
    return removed


def _ours(folder: Path, job_id: int) -> bool:
    from jobs.runfolder import read_marker

    marker = read_marker(folder)
    return marker is not None and marker.get("job") == job_id


def _refuse_shared_folder(store: JobStore, folder: str, job_id: int | None, where: str) -> None:
    """A run folder belongs to one job: never write into, or delete, another job's run."""
    target = os.path.realpath(folder)
    for other in store.list():
        if other.id != job_id and target in {os.path.realpath(f) for f in [other.run_dir, *other.earlier_run_dirs]}:
            raise StudioError(f"the folder {folder} is the run folder of job {other.id} ({other.status}).", where,
                              f"resume job {other.id} instead, choose another output_dir, or delete that job first."
                              if job_id is None else
                              "delete the job without its files; the other job keeps its run.")
