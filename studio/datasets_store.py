"""Datasets the studio knows: the bundled demo and files uploaded into the studio home.

Each upload lives in ``<home>/datasets/<id>/`` beside a ``dataset.json`` that records its
display name, detected format and row count. The folder id never changes, so jobs that
already point at the file keep working after a rename; only the display name moves.
An upload is validated in a staging folder inside the home and moved into place only
when every row passes, so a bad file leaves nothing behind.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from adapters.core.errors import StudioError
from jobs.home import datasets_dir, studio_home
from jobs.runfolder import MARKER, read_marker, remove_marked_folder, write_json_atomic

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
META_FILE = "dataset.json"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "demo"
BUNDLED_ID = "demo"
NAME_LIMIT = 80


@dataclass
class DatasetEntry:
    id: str
    name: str
    file: str  # not "path": gradio_client would take a dict with a "path" for a file to download
    format: str
    rows: int
    eval_file: str | None = None
    eval_rows: int | None = None
    bundled: bool = False
    uploaded_at: float | None = None
    original_name: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class DatasetStore:
    def __init__(self, home: str | Path | None = None):
        self.home = studio_home(home)
        self.root = datasets_dir(self.home)

    # -- reading -------------------------------------------------------------------

    def list(self) -> list[DatasetEntry]:
        entries = [bundled_entry()] if (BUNDLED_DIR / "train.jsonl").is_file() else []
        uploaded = []
        for meta in self.root.glob(f"*/{META_FILE}"):
            if meta.parent.name.startswith("."):
                continue  # an upload still being validated
            try:
                entry = DatasetEntry(**json.loads(meta.read_text(encoding="utf-8")))
            except (ValueError, TypeError):
                continue  # a half-written or foreign folder is not a dataset
            # An entry names its own folder and a file in it, or it was not written by the studio.
            if entry.id == meta.parent.name and Path(entry.file).parent == meta.parent and not entry.bundled:
                uploaded.append(entry)
        return entries + sorted(uploaded, key=lambda e: e.uploaded_at or 0)

    def get(self, key: str) -> DatasetEntry:
        """By id, or by display name (case-insensitive)."""
        key = (key or "").strip()
        entries = self.list()
        for e in entries:
            if e.id == key:
                return e
        for e in entries:
            if e.name.lower() == key.lower():
                return e
        names = ", ".join(e.name for e in entries) or "(none)"
        raise StudioError(f"no dataset named {key!r}.", "dataset", f"choose one of: {names}.")

    # -- writing -------------------------------------------------------------------

    def add(self, upload: str | Path, name: str | None = None, original_name: str | None = None) -> DatasetEntry:
        """Validate ``upload`` and keep a copy; raises StudioError and stores nothing when it is bad."""
        from jobs.data.rows import read_rows
        from jobs.spec import DatasetSpec

        src = Path(upload)
        original = original_name or src.name
        if not src.is_file():  # a folder, a FIFO or a device would never end copying
            raise StudioError("not a regular file.", original, "upload a .jsonl, .json, .csv or .parquet file.")
        suffix = Path(original).suffix.lower() or src.suffix.lower()
        if suffix not in SUFFIXES:
            raise StudioError(f"unsupported file type {suffix or '(none)'!r}.", original,
                              "upload a .jsonl, .json, .csv or .parquet file.")
        name = self._free_name(clean_name(name or Path(original).stem, original))
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            data = staging / f"data{suffix}"
            shutil.copyfile(src, data)
            try:
                train, _, fmt = read_rows(DatasetSpec(path=str(data), eval_fraction=0.0))
            except StudioError as e:
                # Report the user's file name, not the staging copy's.
                where = (e.where or "").replace(str(data), original)
                raise StudioError(e.what, where or original, e.fix) from None
            folder = self._free_folder(slug(name))
            entry = DatasetEntry(id=folder.name, name=name, file=str(folder / data.name), format=fmt,
                                 rows=len(train), uploaded_at=time.time(), original_name=original)
            write_json_atomic(staging / META_FILE, entry.to_dict())
            write_json_atomic(staging / MARKER, {"made_by": "studio", "dataset": folder.name})
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return entry

    def rename(self, key: str, new_name: str) -> DatasetEntry:
        entry = self._own(key, "rename")
        name = clean_name(new_name, entry.name)
        if name.lower() != entry.name.lower():
            name = self._free_name(name, strict=True)
        entry.name = name
        write_json_atomic(Path(entry.file).parent / META_FILE, entry.to_dict())
        return entry

    def delete(self, key: str) -> DatasetEntry:
        entry = self._own(key, "delete")
        users = self._waiting_jobs(entry)
        if users:
            raise StudioError(f"job(s) {', '.join(f'#{j}' for j in users)} still wait for or train on this dataset.",
                              f"dataset {entry.name!r}", "cancel those jobs first, or wait until they finish.")
        folder = self.root / entry.id
        if read_marker(folder) != {"made_by": "studio", "dataset": entry.id}:
            raise StudioError(f"the folder {folder} was not made by this studio's upload (no studio marker).",
                              f"dataset {entry.name!r}", "remove it by hand if you mean to.")
        remove_marked_folder(folder, {"dataset": entry.id}, is_dataset_entry)
        return entry

    # -- helpers -------------------------------------------------------------------

    def _own(self, key: str, verb: str) -> DatasetEntry:
        entry = self.get(key)
        if entry.bundled:
            raise StudioError(f"the bundled dataset {entry.name!r} is part of the studio and cannot {verb}.",
                              "dataset", "upload a copy to change it.")
        return entry

    def _free_name(self, name: str, strict: bool = False) -> str:
        taken = {e.name.lower() for e in self.list()}
        if name.lower() not in taken:
            return name
        if strict:
            raise StudioError(f"a dataset named {name!r} already exists.", "name", "choose another name.")
        n = 2
        while f"{name} ({n})".lower() in taken:
            n += 1
        return f"{name} ({n})"

    def _free_folder(self, base: str) -> Path:
        candidate, n = self.root / base, 1
        while candidate.exists() or candidate.name == BUNDLED_ID:
            n += 1
            candidate = self.root / f"{base}-{n}"
        return candidate

    def _waiting_jobs(self, entry: DatasetEntry) -> list[int]:
        from jobs.runner.store import JobStore, Status

        folder = Path(entry.file).parent
        out = []
        for job in JobStore(self.home).list((Status.QUEUED, Status.RUNNING)):
            ds = job.spec.get("dataset", {})
            if any(p and Path(p).parent == folder for p in (ds.get("path"), ds.get("eval_path"))):
                out.append(job.id)
        return out


def is_dataset_entry(name: str) -> bool:
    """What an upload writes in its folder: the data file, its description, their temporaries."""
    return (name == META_FILE or name.startswith(f".{META_FILE}.")
            or (name.startswith("data.") and Path(name).suffix in SUFFIXES and name.count(".") == 1))


def clean_name(name: str, where: str) -> str:
    name = " ".join((name or "").split())
    if not name:
        raise StudioError("the dataset name is empty.", where, "type a name.")
    if len(name) > NAME_LIMIT:
        raise StudioError(f"the dataset name is {len(name)} characters long.", where,
                          f"use at most {NAME_LIMIT} characters.")
    return name


def slug(name: str) -> str:
    # Folder names stay portable (no spaces, slashes or dots at the start) whatever the display name.
    text = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_").lower()
    return text[:40] or "dataset"


_bundled_cache: dict[str, DatasetEntry] = {}


def bundled_entry() -> DatasetEntry:
    """The demo dataset shipped with the studio; counted once per process."""
    if BUNDLED_ID not in _bundled_cache:
        from jobs.data.rows import read_rows
        from jobs.spec import DatasetSpec

        train, evals = BUNDLED_DIR / "train.jsonl", BUNDLED_DIR / "eval.jsonl"
        spec = DatasetSpec(path=str(train), eval_path=str(evals) if evals.is_file() else None,
                           max_eval_rows=1_000_000, eval_fraction=0.0)
        rows, held, fmt = read_rows(spec)
        _bundled_cache[BUNDLED_ID] = DatasetEntry(
            id=BUNDLED_ID, name="demo (bundled)", file=str(train), format=fmt, rows=len(rows),
            eval_file=spec.eval_path, eval_rows=len(held) if spec.eval_path else None, bundled=True,
            original_name="assets/demo/train.jsonl")
    return DatasetEntry(**_bundled_cache[BUNDLED_ID].to_dict())
