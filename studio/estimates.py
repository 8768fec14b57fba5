"""Memory estimates already made, kept in the studio home.

The Train tab checks the spec on every change of the form, and an estimate probes a small
copy of the model in the model process (seconds of CPU). A spec seen before is answered
from here in milliseconds, also after a restart. The key is everything the answer depends
on: the spec as the form sent it, the device, the code (studio.catalog.code_version) and a
fingerprint (size, modification time) of every local file the spec names, so an edited
dataset or model is estimated again.
"""
from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from jobs.runfolder import write_json_atomic
from studio.catalog import code_version

KEEP = 500  # cached answers; the oldest go beyond this (each is a few hundred bytes)


@lru_cache(maxsize=1)
def _code() -> str:
    return code_version()  # hashing the sources once per process is enough: a change restarts it


def fingerprint(ref: object) -> list:
    """Size and mtime of a local file, or of the files directly inside a local folder; [] otherwise."""
    if not isinstance(ref, str) or not ref:
        return []
    path = Path(ref).expanduser()
    try:
        if path.is_file():
            st = path.stat()
            return [[path.name, st.st_size, st.st_mtime_ns]]
        if path.is_dir():
            return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()]
    except OSError:
        pass
    return []


class EstimateCache:
    def __init__(self, home: Path):
        self.folder = home / "cache" / "estimates"

    def key(self, data: dict, device: str) -> str:
        ds = data.get("dataset") if isinstance(data.get("dataset"), dict) else {}
        files = {"model": fingerprint(data.get("model")), "path": fingerprint(ds.get("path")),
                 "eval_path": fingerprint(ds.get("eval_path"))}
        blob = json.dumps({"spec": data, "device": device, "code": _code(), "files": files}, sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        try:
            return json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def put(self, key: str, result: dict) -> None:
        write_json_atomic(self.folder / f"{key}.json", result)
        entries = sorted(self.folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-KEEP]:
            old.unlink(missing_ok=True)
