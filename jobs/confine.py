"""What an API caller may point the studio at: the one confinement policy that the web
API, the page, job submission and spec checking all apply.

The machine's own user, at the command line, may name any path (``Policy.open``). Anyone
who reaches the web server is a stranger (on localhost that includes any web page the
user visits), so the server applies a confined policy: every path it is given must
resolve, symlinks followed, inside the studio home's own folders or a folder the
operator allowed with ``--allow-path``; run folders are chosen by the studio; remote
model code and multi-node rendezvous need a start-up flag of their own.

Jobs follow the same rule: the server acts (cancel, resume, retry, delete, export,
evaluate, generate, compare) only on jobs whose run folders all lie inside the home or an
``--allow-path`` folder (``Policy.holds_run``). A job the machine's own user queued from
the command line with its output_dir elsewhere is still listed, with its status and
progress; everything else about it stays with the command line.
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from adapters.core.errors import StudioError
from jobs.home import datasets_dir, models_dir, uploads_dir
from jobs.spec import DEFAULT_MODEL

# owner/name as the Hub spells it; no "..", no leading dot or slash, so never a path trick.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*(?:[.][A-Za-z0-9_-]+)*/[A-Za-z0-9][A-Za-z0-9_-]*(?:[.][A-Za-z0-9_-]+)*$")
HUB_ID_LIMIT = 96


def contained(path: str | os.PathLike, roots) -> Path | None:
    """``path`` with every symlink resolved, when that lies inside one of ``roots`` (also
    resolved); else None. A symlink in the home pointing out is therefore outside."""
    real = Path(path).expanduser().resolve()
    for root in roots:
        if real.is_relative_to(Path(root).expanduser().resolve()):
            return real
    return None


def machine_devices() -> int:
    """Data-parallel processes this machine can run: its visible GPUs, else its CPU cores.
    Counted without torch, since the web process never imports it."""
    gpus = len(glob.glob("/dev/nvidia[0-9]*"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = min(gpus, len([d for d in visible.split(",") if d.strip()]))
    if gpus:
        return gpus
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_devices(devices: int, where: str) -> None:
    have = machine_devices()
    if devices > have:
        raise StudioError(f"training.devices is {devices}, but this machine has {have} device(s) "
                          f"({'GPUs' if glob.glob('/dev/nvidia[0-9]*') else 'CPU cores'}).", where,
                          f"set training.devices to {have} or fewer.")


@dataclass(frozen=True)
class Policy:
    home: Path
    confined: bool = True
    allow_paths: tuple[Path, ...] = ()  # operator's --allow-path folders (read and write)
    allow_remote_code: bool = False  # operator's --allow-remote-code
    allow_multi_node: bool = False  # operator's --allow-multi-node
    models: tuple[str, ...] = ()  # model references the operator chose (--model), taken as they are
    readonly: tuple[Path, ...] = ()  # the studio's own bundled files (the demo dataset)

    @classmethod
    def open(cls, home: str | os.PathLike) -> "Policy":
        """The command line: the machine's own user may name anything."""
        return cls(Path(home), confined=False)

    # -- the allowed places --------------------------------------------------------------

    def dataset_roots(self) -> tuple[Path, ...]:
        return (datasets_dir(self.home), uploads_dir(self.home), *self.readonly, *self.allow_paths)

    def model_roots(self) -> tuple[Path, ...]:
        return (models_dir(self.home), *self.allow_paths)

    def place(self, value: str, roots, where: str, what: str) -> str:
        """``value`` (relative to the home) resolved and inside ``roots``, or a refusal."""
        raw = Path(str(value)).expanduser()
        real = contained(raw if raw.is_absolute() else self.home / raw, roots)
        if real is None:
            shown = ", ".join(str(r) for r in roots)
            raise StudioError(f"{what} {value!r} is outside the folders this server may use ({shown}); "
                              "symlinks are followed before this check.", where,
                              "use a stored dataset or model by its name, or upload it; the operator can widen "
                              "this by starting the server with --allow-path DIR.")
        return str(real)

    def dataset(self, value: str, where: str = "dataset.path") -> str:
        return self.place(value, self.dataset_roots(), where, "dataset file") if self.confined else value

    def model(self, ref: str, where: str = "model") -> str:
        """A Hub id or an operator-chosen model as it is; anything path-like must lie in the models folder."""
        ref = str(ref or "").strip()
        if not self.confined or ref in self.models:
            return ref
        hub_like = len(ref) <= HUB_ID_LIMIT and HUB_ID.match(ref) and not ref.lower().endswith(".gguf")
        if ref == DEFAULT_MODEL or (hub_like and not Path(ref).exists() and not (self.home / ref).exists()):
            return ref
        return self.place(ref, self.model_roots(), where, "model")

    # -- run folders -----------------------------------------------------------------------

    def run_roots(self) -> tuple[Path, ...]:
        """Where the run folders of jobs this server may act on lie: the home, or a folder the operator allowed."""
        return (self.home, *self.allow_paths)

    def holds_run(self, *folders: str | os.PathLike) -> bool:
        """Whether a job with these run folders (every attempt's, and a new attempt's before it is
        made) is one this server may act on: each inside ``run_roots`` once symlinks are followed.
        The command line's open policy holds every run."""
        return not self.confined or all(contained(f, self.run_roots()) is not None for f in folders)

    # -- a whole spec ----------------------------------------------------------------------

    def check_spec(self, resolved: dict, *, output_dir_given: bool, where: str = "spec") -> dict:
        """The validated spec with its paths confined (returned resolved), or a refusal naming
        the flag that would allow it. Open policies return it unchanged."""
        if not self.confined:
            return resolved
        out = {**resolved, "dataset": dict(resolved["dataset"])}
        training = resolved.get("training") or {}
        if resolved.get("trust_remote_code") and not self.allow_remote_code:
            raise StudioError("trust_remote_code runs code shipped with a model inside this machine.",
                              f"{where}: trust_remote_code",
                              "leave it false; the operator can allow it by starting the server with "
                              "--allow-remote-code.")
        if (training.get("nnodes", 1) > 1 or training.get("rdzv_endpoint") or training.get("node_rank", 0)) \
                and not self.allow_multi_node:
            raise StudioError("multi-node training (nnodes, node_rank, rdzv_endpoint) makes this machine "
                              "connect to another host.", f"{where}: training.rdzv_endpoint",
                              "train on this machine alone; the operator can allow it by starting the server "
                              "with --allow-multi-node.")
        if training.get("mlflow_tracking_uri"):
            raise StudioError("an MLflow tracking URI makes the job write to another server or folder.",
                              f"{where}: training.mlflow_tracking_uri",
                              "leave it empty (MLflow then logs to mlruns/ in the studio home), or submit the run "
                              "from the command line (studio jobs submit), which may name any tracking URI.")
        if output_dir_given:
            given = resolved.get("output_dir") or ""
            if not self.allow_paths or contained(given if Path(given).is_absolute() else self.home / given,
                                                 self.allow_paths) is None:
                raise StudioError("output_dir is chosen by the studio (<home>/runs/<job id>) for jobs started "
                                  "from the web.", f"{where}: output_dir",
                                  "leave output_dir out; the operator can let callers write under a folder by "
                                  "starting the server with --allow-path DIR.")
            out["output_dir"] = self.place(given, self.allow_paths, f"{where}: output_dir", "output_dir")
        for key in ("path", "eval_path"):
            if out["dataset"].get(key):
                out["dataset"][key] = self.dataset(out["dataset"][key], f"{where}: dataset.{key}")
        out["model"] = self.model(out["model"], f"{where}: model")
        return out
