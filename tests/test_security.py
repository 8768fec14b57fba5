"""Hostile calls against the real app: every one is refused with a message that says why,
and canary files inside and outside the studio home stay as they were.

The app runs once for the module, on a free localhost port with a temporary home, one
--allow-path folder and no scheduler (nothing here trains: a job that got queued would sit
there, and the test would see it). Each case is one line of data: the endpoint, its
arguments (built from the paths of this run), and what the refusal must say. Each row is
meant to reach its own guard: deleting that guard makes the row fail.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import httpx
import pytest
from helpers import build_tiny_llama, toy_rows, write_jsonl

from jobs.runfolder import MARKER, make_marked_folder, write_json_atomic
from jobs.runner.store import JobStore, Status

pytestmark = pytest.mark.timeout(300)
UPLOAD_LIMIT_MB = 0.05  # small, so the over-large upload below is cheap


class Paths:
    """The places the cases point at."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "home"
        self.outside = root / "outside"
        self.allowed = root / "allowed"  # the operator's --allow-path folder
        self.model = self.home / "models" / "tiny"
        self.jobs: dict[str, int] = {}

    def spec(self, **changes) -> dict:
        """A valid spec (a stored dataset, the operator's model) with ``changes`` merged by section."""
        spec = {"model": str(self.model), "dataset": {"path": "numbers"}, "method": {"name": "lora", "r": 4},
                "optimizer": {"name": "adamw"}, "training": {"max_steps": 2, "max_seq_len": 64}}
        for key, value in changes.items():
            spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
        return spec


def prepare(p: Paths) -> None:
    p.outside.mkdir()
    write_jsonl(p.outside / "data.jsonl", toy_rows(20))
    (p.outside / "secret.csv").write_text("ssn,salary\n1,2\n", encoding="utf-8")
    (p.outside / "canary.txt").write_text("outside canary\n", encoding="utf-8")
    (p.outside / ".bashrc").write_text("export KEEP=1\n", encoding="utf-8")
    build_tiny_llama(p.outside / "model")
    build_tiny_llama(p.model)
    (p.home / "canary.txt").write_text("inside canary\n", encoding="utf-8")
    # Symlinks placed in the home that point out of it.
    os.symlink(p.outside / "data.jsonl", p.home / "datasets" / "link.jsonl")
    os.symlink(p.outside / "model", p.home / "models" / "link")
    os.symlink(p.outside, p.home / "uploads" / "out")

    # A bake-off manifest and report outside the bake-offs folder, reachable by an id with "..".
    fake = p.outside / "fake-bakeoff"
    fake.mkdir()
    write_json_atomic(fake / "bakeoff.json", {"id": "fake", "status": "done", "search": [], "final": [],
                                              "candidates": [], "error": None})
    write_json_atomic(fake / "report.json", {"leaked": "ssn,salary"})
    p.allowed.mkdir()

    store = JobStore(p.home)
    spec = p.spec()

    def job(name: str, run_dir: Path, status: Status, marker_for: str | None = None, spec: dict = spec) -> int:
        jid = store.submit(spec, name=name, run_dir=str(run_dir)).id
        if marker_for == "self":
            make_marked_folder(run_dir, {"job": jid})
        if status != Status.QUEUED:
            store.claim(jid, "cpu")
            if status != Status.RUNNING:
                store.finish(jid, status, "made by the test")
        p.jobs[name] = jid
        return jid

    running = job("running", p.home / "runs" / "running", Status.RUNNING, marker_for="self")
    write_json_atomic(p.home / "runs" / "running" / "run.json", {"status": "running", "step": 1})
    # A job whose run folder is the user's own (as `output_dir: ~` would have made it).
    job("foreign", p.outside, Status.FAILED)
    # A completed run, and a second job naming the same folder: deleting it must not take the run.
    done = job("completed", p.home / "runs" / "done", Status.COMPLETED, marker_for="self")
    write_json_atomic(p.home / "runs" / "done" / "run.json", {"status": "completed"})
    job("same-folder", p.home / "runs" / "done", Status.FAILED)
    # A run folder that is a symlink out of the home, with a marker copied into its target.
    target = p.outside / "target"
    target.mkdir()
    (target / "keep.txt").write_text("keep\n", encoding="utf-8")
    os.symlink(target, p.home / "runs" / "linked")
    jid = job("symlinked", p.home / "runs" / "linked", Status.FAILED)
    (target / MARKER).write_text(json.dumps({"made_by": "studio", "job": jid}), encoding="utf-8")
    # Inside the home, so the web may act on them: a folder the studio did not make, and a
    # symlink to a folder that carries the job's marker.
    (p.home / "runs" / "unmarked").mkdir()
    (p.home / "runs" / "unmarked" / "notes.txt").write_text("the user's notes\n", encoding="utf-8")
    job("unmarked", p.home / "runs" / "unmarked", Status.FAILED)
    jid = job("alias", p.home / "runs" / "alias", Status.FAILED)
    make_marked_folder(p.home / "runs" / "aliased", {"job": jid})
    os.symlink(p.home / "runs" / "aliased", p.home / "runs" / "alias")
    # A run whose folder is the home itself: retrying it would put the next attempt beside the home.
    job("home as run", p.home, Status.FAILED)
    # A run in the operator's --allow-path folder, which a launch must not write into again.
    job("allowed", p.allowed / "run", Status.COMPLETED, marker_for="self")
    # Jobs the operator queued from the command line with their output_dir outside the home:
    # the web lists them and acts on none of them.
    cli_spec = p.spec(dataset={"path": str(p.outside / "data.jsonl")})
    cli = p.outside / "cli-run"
    jid = job("cli completed", cli, Status.COMPLETED, marker_for="self", spec=cli_spec)
    write_json_atomic(cli / "run.json", {"status": "completed", "samples": [{"target": "samples canary", "output": "x"}],
                                         "metrics": {"train_loss": 1.0}})
    (cli / "log.txt").write_text("log canary\n", encoding="utf-8")
    (cli / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n', encoding="utf-8")
    job("cli queued", p.outside / "cli-queued", Status.QUEUED, spec=cli_spec)
    assert running and done and jid


UPLOAD_REFUSED = "not uploaded through this studio"
OUTSIDE = "outside the studio home, so the web API does not "  # studio.ui.common.job_for's refusal


class Server(str):
    """A refusal Gradio makes before the studio is called: the client is told only that the call
    failed (show_error=False withholds the message), and the server's log names the reason."""


GRADIO_REFUSED = 'event: error\ndata: {"error": null}'
# (what it tries, endpoint, arguments from Paths, what the refusal says)
CASES = [
    ("dataset outside the home", "/launch", lambda p: [p.spec(dataset={"path": str(p.outside / "data.jsonl")}), "", 0], "outside the folders"),
    ("estimate reads a CSV outside", "/estimate", lambda p: [p.spec(dataset={"path": str(p.outside / "secret.csv")}), "cpu"], "outside the folders"),
    ("estimate reads /etc/passwd", "/estimate", lambda p: [p.spec(dataset={"path": "/etc/passwd"}), "cpu"], "outside the folders"),
    ("dataset by ..", "/launch", lambda p: [p.spec(dataset={"path": "datasets/../../outside/data.jsonl"}), "", 0], "outside the folders"),
    ("dataset through a symlink out", "/launch", lambda p: [p.spec(dataset={"path": str(p.home / "datasets" / "link.jsonl")}), "", 0], "symlinks are followed"),
    ("dataset through the uploads symlink", "/estimate", lambda p: [p.spec(dataset={"path": str(p.home / "uploads" / "out" / "data.jsonl")}), "cpu"], "outside the folders"),
    ("eval file outside", "/launch", lambda p: [p.spec(dataset={"eval_path": str(p.outside / "data.jsonl")}), "", 0], "dataset.eval_path"),
    ("dataset is the job store", "/launch", lambda p: [p.spec(dataset={"path": str(p.home / "jobs.sqlite")}), "", 0], "outside the folders"),
    ("model folder outside", "/launch", lambda p: [p.spec(model=str(p.outside / "model")), "", 0], "outside the folders"),
    ("model by ..", "/estimate", lambda p: [p.spec(model="models/../../outside/model"), "cpu"], "outside the folders"),
    ("model through a symlink out", "/launch", lambda p: [p.spec(model=str(p.home / "models" / "link")), "", 0], "symlinks are followed"),
    ("playground base model outside", "/generate", lambda p: ["hi", [], True, str(p.outside / "model"), 4, 0.0], "outside the folders"),
    ("output_dir outside", "/launch", lambda p: [p.spec(output_dir=str(p.outside)), "", 0], "--allow-path"),
    ("output_dir relative ../..", "/launch", lambda p: [p.spec(output_dir="../../x"), "", 0], "output_dir is chosen by the studio"),
    ("output_dir onto another run", "/launch", lambda p: [p.spec(output_dir=str(p.allowed / "run")), "", 0], "is the run folder of job"),
    ("remote code", "/launch", lambda p: [p.spec(trust_remote_code=True), "", 0], "--allow-remote-code"),
    ("remote code as text", "/estimate", lambda p: [p.spec(trust_remote_code="false"), "cpu"], "valid boolean"),
    ("rendezvous endpoint", "/launch", lambda p: [p.spec(training={"rdzv_endpoint": "10.0.0.1:29500"}), "", 0], "--allow-multi-node"),
    ("two nodes", "/launch", lambda p: [p.spec(training={"nnodes": 2, "rdzv_endpoint": "evil.example:1"}), "", 0], "--allow-multi-node"),
    ("shell in the endpoint", "/estimate", lambda p: [p.spec(training={"rdzv_endpoint": "x;rm -rf ~:1"}), "cpu"], "rdzv_endpoint"),
    ("64 devices", "/launch", lambda p: [p.spec(training={"devices": 64}), "", 0], "this machine has"),
    ("10**12 steps", "/launch", lambda p: [p.spec(training={"max_steps": 10**12}), "", 0], "max_steps"),
    ("10**9 sequence length", "/estimate", lambda p: [p.spec(training={"max_seq_len": 10**9}), "cpu"], "max_seq_len"),
    ("infinite epochs", "/launch", lambda p: [p.spec(training={"epochs": "inf"}), "", 0], "training.epochs"),
    ("NaN learning rate", "/launch", lambda p: [p.spec(optimizer={"name": "adamw", "lr": "nan"}), "", 0], "optimizer.lr"),
    ("NaN lora alpha", "/estimate", lambda p: [p.spec(method={"name": "lora", "alpha": "nan"}), "cpu"], "method.alpha"),
    ("huge lora rank", "/estimate", lambda p: [p.spec(method={"name": "lora", "r": 10**15}), "cpu"], "method.r"),
    ("huge priority", "/launch", lambda p: [p.spec(), "", 10**20], "priority must be"),
    ("priority as text", "/launch", lambda p: [p.spec(), "", "9"], "priority must be"),
    ("a 10k-character name", "/launch", lambda p: [p.spec(), "x" * 10_000, 0], "name must be text"),
    ("spec that is not a mapping", "/estimate", lambda p: ["model: x", "cpu"], "must be a mapping"),
    ("SQL in a job id", "/job_status", lambda p: ["1; DROP TABLE jobs"], "is not a job id"),
    ("SQL OR in a job id", "/cancel", lambda p: ["1 OR 1=1"], "is not a job id"),
    ("path in a job id", "/retry", lambda p: ["../1"], "is not a job id"),
    ("a 31-digit job id", "/job_status", lambda p: [10**30], "is not a job id"),
    ("UNION in an export id", "/export_merged", lambda p: ["1 UNION SELECT 1"], "is not a job id"),
    ("files as the text 'false'", "/delete_job", lambda p: [p.jobs["completed"], "false"], "must be true or false"),
    ("delete a running job", "/delete_job", lambda p: [p.jobs["running"], True], "is running"),
    ("delete a folder the studio did not make", "/delete_job", lambda p: [p.jobs["unmarked"], True], "not made by this studio"),
    ("delete through a symlink inside the home", "/delete_job", lambda p: [p.jobs["alias"], True], "not made by this studio"),
    ("delete another job's run", "/delete_job", lambda p: [p.jobs["same-folder"], True], "run folder of job"),
    ("delete the user's own folder", "/delete_job", lambda p: [p.jobs["foreign"], True], OUTSIDE + "delete its files.*studio jobs delete \\d+ --files"),
    ("delete through a symlink out of the home", "/delete_job", lambda p: [p.jobs["symlinked"], True], OUTSIDE + "delete its files"),
    ("delete a job queued from the CLI, files kept", "/delete_job", lambda p: [p.jobs["cli queued"], False], OUTSIDE + "delete it.*studio jobs delete \\d+ --home"),
    ("cancel a job queued from the CLI", "/cancel", lambda p: [p.jobs["cli queued"]], OUTSIDE + "cancel it.*studio jobs cancel \\d+"),
    ("resume a run outside the home", "/resume", lambda p: [p.jobs["foreign"]], OUTSIDE + "resume it.*studio jobs resume \\d+"),
    ("retry a run outside the home", "/retry", lambda p: [p.jobs["cli completed"]], OUTSIDE + "retry it.*studio jobs retry \\d+"),
    ("retry a run whose folder is the home", "/retry", lambda p: [p.jobs["home as run"]], "would make its new run folder .*-attempt2 outside"),
    ("export merged a run outside the home", "/export_merged", lambda p: [p.jobs["cli completed"]], OUTSIDE + "export it.*studio export \\S+ --merged OUT"),
    ("export the adapter of a run outside", "/export_adapter", lambda p: [p.jobs["cli completed"]], OUTSIDE + "export it.*--adapter OUT"),
    ("export GGUF of a run outside", "/export_gguf", lambda p: [p.jobs["cli completed"], "f16"], OUTSIDE + "export it.*--gguf OUT.gguf"),
    ("evaluate a run outside the home", "/evaluate", lambda p: [p.jobs["cli completed"], "heldout", None], OUTSIDE + "evaluate it.*studio evaluate"),
    ("generate with a run outside the home", "/generate", lambda p: ["hi", [p.jobs["cli completed"]], True, "", 4, 0.0], OUTSIDE + "generate with it.*studio generate"),
    ("compare a run outside the home", "/compare", lambda p: [[p.jobs["completed"], p.jobs["cli completed"]]], OUTSIDE + "compare it.*studio jobs show"),
    ("forged upload of /etc/passwd", "raw /upload_dataset", lambda p: [forged("/etc/passwd"), ""], UPLOAD_REFUSED),
    ("forged upload of the job store", "raw /upload_dataset", lambda p: [forged(p.home / "jobs.sqlite"), ""], UPLOAD_REFUSED),
    ("forged upload by .. from uploads", "raw /upload_dataset", lambda p: [forged(p.home / "uploads" / ".." / "canary.txt"), ""], UPLOAD_REFUSED),
    ("forged upload through a symlink", "raw /upload_dataset", lambda p: [forged(p.home / "uploads" / "out" / "data.jsonl"), ""], UPLOAD_REFUSED),
    ("forged file data naming a blocked file", "raw /upload_dataset", lambda p: [forged(p.home / "jobs.sqlite", marked=True), ""], Server("located in one of the blocked_paths")),
    ("forged file data naming a file outside", "raw /upload_dataset", lambda p: [forged(p.outside / "secret.csv", marked=True), ""], Server("was not uploaded by a user")),
    ("a 100k-character prompt", "/generate", lambda p: ["x" * 100_000, [], True, "", 4, 0.0], "prompt must be text"),
    ("10**9 new tokens", "/generate", lambda p: ["hi", [], True, "", 10**9, 0.0], "max_new_tokens must be"),
    ("NaN temperature", "/generate", lambda p: ["hi", [], True, "", 4, "nan"], "temperature must be"),
    ("include_base as text", "/generate", lambda p: ["hi", [], "false", "", 4, 0.0], "include_base must be"),
    ("compare a thousand runs", "/compare", lambda p: [list(range(1, 1001))], "choose at most"),
    ("bake-off on a dataset outside", "/bakeoff_start", lambda p: [p.spec(dataset={"path": str(p.outside / "data.jsonl")}), ["lora"], None, 2, None, 1, [1.0]], "outside the folders"),
    ("bake-off with remote code", "/bakeoff_start", lambda p: [p.spec(trust_remote_code=True), ["lora"], None, 2, None, 1, [1.0]], "--allow-remote-code"),
    ("bake-off with a million seeds", "/bakeoff_start", lambda p: [p.spec(), ["lora"], None, 2, None, 10**6, [1.0]], "seeds must be"),
    ("bake-off with a NaN rate factor", "/bakeoff_start", lambda p: [p.spec(), ["lora"], None, 2, None, 1, ["nan"]], "lr_factors must be"),
    ("MLflow tracking URI to another host", "/launch", lambda p: [p.spec(training={"report_to": ["mlflow"], "mlflow_tracking_uri": "http://evil.example:5000"}), "", 0], "mlflow_tracking_uri"),
    ("MLflow file store outside", "/estimate", lambda p: [p.spec(training={"mlflow_tracking_uri": f"file://{p.outside}"}), "cpu"], "mlflow_tracking_uri"),
    ("lm-eval task that is an option", "/evaluate", lambda p: [p.jobs["completed"], "--output_path=/tmp/x", None], "task names"),
    ("lm-eval limit of 10**12", "/evaluate", lambda p: [p.jobs["completed"], "heldout", 10**12], "limit must be"),
    ("GGUF type as a path", "/export_gguf", lambda p: [p.jobs["completed"], "../../q4_0"], "unknown GGUF type"),
    ("bake-off id by ..", "/bakeoff_status", lambda p: ["../../outside/fake-bakeoff"], "no bake-off"),
    ("bake-off report by ..", "/bakeoff_report", lambda p: ["../../outside/fake-bakeoff"], "no bake-off"),
    ("bake-off id as an absolute path", "/bakeoff_status", lambda p: [str(p.outside / "fake-bakeoff")], "no bake-off"),
]


def forged(path, marked: bool = False) -> dict:
    """File data naming a server path, as a hostile client would send it (never uploaded)."""
    return {"path": str(path), "orig_name": "data.jsonl", **({"meta": {"_type": "gradio.FileData"}} if marked else {})}


def call(client, url: str, endpoint: str, args: list):
    """``endpoint`` through gradio_client, or as raw HTTP when it starts with "raw " (gradio_client
    would upload a local file a dict names, so it cannot send a forged server path)."""
    from gradio_client.exceptions import AppError

    if not endpoint.startswith("raw "):
        return client.predict(*args, api_name=endpoint)
    name = endpoint.split("/", 1)[1]
    event = httpx.post(f"{url}/gradio_api/call/{name}", json={"data": args}, timeout=30).json()["event_id"]
    answer = httpx.get(f"{url}/gradio_api/call/{name}/{event}", timeout=60).text
    if "event: error" in answer:
        raise AppError(answer)
    return answer


# Plain HTTP: (what it tries, method, path from Paths, extra headers, expected status, what the answer says)
HTTP_CASES = [
    ("the job store by file=", "GET", lambda p: f"/gradio_api/file={p.home / 'jobs.sqlite'}", {}, 403, "not allowed"),
    ("a run.json by file=", "GET", lambda p: f"/gradio_api/file={p.home / 'runs' / 'done' / 'run.json'}", {}, 403, "not allowed"),
    ("a file outside by file=", "GET", lambda p: f"/gradio_api/file={p.outside / 'canary.txt'}", {}, 403, "not allowed"),
    ("the store by exports/..", "GET", lambda p: f"/gradio_api/file={p.home / 'exports'}/../jobs.sqlite", {}, 403, "not allowed"),
    ("outside through the uploads symlink", "GET", lambda p: f"/gradio_api/file={p.home / 'uploads' / 'out' / 'canary.txt'}", {}, 403, "not allowed"),
    ("/etc/passwd by file=", "GET", lambda p: "/gradio_api/file=/etc/passwd", {}, 403, "not allowed"),
    ("a URL fetched by the server", "GET", lambda p: "/gradio_api/file=http://example.com/x", {}, 403, "does not fetch URLs"),
    ("DNS rebinding (foreign Host)", "GET", lambda p: "/gradio_api/info", {"Host": "evil.example:7860"}, 403, "loopback address only"),
    ("another site's page", "POST", lambda p: "/gradio_api/call/list_jobs", {"Origin": "http://evil.example"}, 403, "another site"),
    ("a sandboxed page (Origin null)", "POST", lambda p: "/gradio_api/call/list_jobs", {"Origin": "null"}, 403, "another site"),
    ("same host, other port", "POST", lambda p: "/gradio_api/call/list_jobs", {"Origin": "http://127.0.0.1:1"}, 403, "another site"),
]


def snapshot(p: Paths) -> dict:
    """Every file outside the home and the canaries and runs inside it, with their bytes."""
    out = {}
    for base in (p.outside, p.home / "runs"):
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.is_symlink():
                out[str(path)] = path.read_bytes()
            elif path.is_dir() or path.is_symlink():
                out[str(path)] = "dir" if path.is_dir() else "link"
    out["inside"] = (p.home / "canary.txt").read_bytes()
    out["datasets"] = sorted(x.name for x in (p.home / "datasets").iterdir())
    return out


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    from helpers import free_port

    p = Paths(tmp_path_factory.mktemp("security"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STUDIO_HOME", str(p.home))
        mp.setenv("GRADIO_TEMP_DIR", str(p.home / "uploads"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        from jobs.home import studio_home
        from studio.ui.app import launch

        studio_home(p.home)
        (p.home / "uploads").mkdir()
        prepare(p)
        port = free_port()
        demo, _ = launch(p.home, port=port, default_model=str(p.model), block=False, scheduler=False,
                         max_upload_mb=UPLOAD_LIMIT_MB, allow_paths=(str(p.allowed),))
        p.url, p.demo = f"http://127.0.0.1:{port}", demo
        try:
            yield p
        finally:
            demo.close()


@pytest.fixture(scope="module")
def client(studio):
    from gradio_client import Client, handle_file

    c = Client(studio.url + "/", verbose=False)
    data = write_jsonl(studio.root / "numbers.jsonl", toy_rows(20))
    assert c.predict(handle_file(str(data)), "numbers", api_name="/upload_dataset")["name"] == "numbers"
    return c


def test_there_are_enough_hostile_cases():
    assert len(CASES) + len(HTTP_CASES) >= 25
    assert len({c[0] for c in CASES + HTTP_CASES}) == len(CASES) + len(HTTP_CASES)


def store_rows(p: Paths) -> list[tuple]:
    return [(j.id, j.status, j.run_dir, j.attempt, j.cancel_requested) for j in JobStore(p.home).list()]


@pytest.mark.parametrize("what, endpoint, args, refusal", CASES, ids=[c[0] for c in CASES])
@pytest.mark.slow
def test_a_hostile_call_is_refused(studio, client, capfd, what, endpoint, args, refusal):
    from gradio_client.exceptions import AppError

    before, jobs = snapshot(studio), store_rows(studio)
    capfd.readouterr()
    with pytest.raises(AppError, match=re.escape(GRADIO_REFUSED) if isinstance(refusal, Server) else refusal) as err:
        call(client, studio.url, endpoint, args(studio))
    if isinstance(refusal, Server):  # Gradio's own refusal, for this reason, and no other failure
        assert re.search(r"InvalidPathError: Cannot move .* " + refusal, capfd.readouterr().err)
    assert "Traceback" not in str(err.value)
    assert "ssn" not in str(err.value)  # nothing read from a file outside leaks into the message
    assert snapshot(studio) == before
    assert store_rows(studio) == jobs  # nothing queued, retried, cancelled or deleted


# Calls that answer, but must not hand out what a job outside the home keeps (its spec, log
# and samples): (what, endpoint, arguments from Paths)
WITHHELD_CASES = [
    ("status of a completed run outside the home", "/job_status", lambda p: [p.jobs["cli completed"]]),
    ("status of a job queued from the CLI", "/job_status", lambda p: [p.jobs["cli queued"]]),
    ("status of a run through a symlink out", "/job_status", lambda p: [p.jobs["symlinked"]]),
    ("the job list", "/list_jobs", lambda p: []),
]
OUTSIDE_SECRETS = ("log canary", "samples canary", "data.jsonl")  # in the CLI jobs' log, run.json and spec


@pytest.mark.parametrize("what, endpoint, args", WITHHELD_CASES, ids=[c[0] for c in WITHHELD_CASES])
def test_a_job_outside_the_home_is_listed_but_not_shown(studio, client, what, endpoint, args):
    before = snapshot(studio)
    answer = client.predict(*args(studio), api_name=endpoint)
    text = json.dumps(answer)
    assert not [s for s in OUTSIDE_SECRETS if s in text], text
    for row in answer if isinstance(answer, list) else [answer]:  # status and progress are shown
        assert {"status", "step", "progress", "train_loss"} <= set(row)
    if endpoint == "/job_status":
        assert answer["spec_yaml"] == "" and answer["log"] == "" and answer["samples"] == []
        assert OUTSIDE in answer["withheld"] and f"studio jobs logs {answer['id']}" in answer["withheld"]
    else:  # every job is listed, those outside the home too
        assert {r["id"] for r in answer} >= {studio.jobs["cli completed"], studio.jobs["cli queued"]}
    assert snapshot(studio) == before


def test_a_job_inside_the_home_is_shown_whole(studio, client):
    """The other side of the rule: the same call on a run in the home hands out its spec and log."""
    folder = studio.home / "runs" / "done"
    (folder / "log.txt").write_text("inside log\n", encoding="utf-8")
    s = client.predict(studio.jobs["completed"], api_name="/job_status")
    assert s["withheld"] is None and "inside log" in s["log"] and "numbers" in s["spec_yaml"]
    assert client.predict(studio.jobs["allowed"], api_name="/job_status")["withheld"] is None  # --allow-path


@pytest.mark.parametrize("what, method, path, headers, status, says", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_a_hostile_request_is_refused(studio, client, what, method, path, headers, status, says):
    before = snapshot(studio)
    body = {"json": {"data": []}} if method == "POST" else {}
    answer = httpx.request(method, studio.url + path(studio), headers=headers, timeout=30, **body)
    assert answer.status_code == status and says in answer.text
    assert snapshot(studio) == before


# Files that Gradio's allow-list would serve if it covered the home (as it does when the
# operator's GRADIO_TEMP_DIR, or a path allowed to Gradio, lies above the home): only the
# app's blocked_paths refuses them. (what, path from Paths)
BLOCKED_CASES = [
    ("the job store", lambda p: p.home / "jobs.sqlite"),
    ("a run's run.json", lambda p: p.home / "runs" / "done" / "run.json"),
    ("a stored dataset", lambda p: next((p.home / "datasets").glob("numbers*/*.jsonl"))),
    ("a model's config", lambda p: p.model / "config.json"),
]


@pytest.mark.parametrize("what, path", BLOCKED_CASES, ids=[c[0] for c in BLOCKED_CASES])
def test_blocked_paths_refuse_what_a_wider_allow_list_would_serve(studio, client, monkeypatch, what, path):
    monkeypatch.setattr(studio.demo, "allowed_paths", [*studio.demo.allowed_paths, str(studio.home)])
    served = httpx.get(f"{studio.url}/gradio_api/file={studio.home / 'canary.txt'}", timeout=30)
    assert served.status_code == 200 and served.text == "inside canary\n"  # the wider allow-list is in force
    target = path(studio)
    assert target.is_file()
    answer = httpx.get(f"{studio.url}/gradio_api/file={target}", timeout=30)
    assert answer.status_code == 403 and "not allowed" in answer.text


# Every endpoint the API offers, each named; a new one joins this list on purpose.
API = {"upload_dataset", "list_datasets", "estimate", "launch", "list_jobs", "job_status", "cancel", "resume", "retry",
       "delete_job", "compare", "evaluate", "generate", "export_merged", "export_adapter", "export_gguf",
       "bakeoff_start", "bakeoff_cancel", "bakeoff_resume", "bakeoff_status", "bakeoff_report"}


def test_the_api_offers_only_named_endpoints(studio):
    info = httpx.get(studio.url + "/gradio_api/info", timeout=30).json()
    assert {name.lstrip("/") for name in info["named_endpoints"]} == API and not info["unnamed_endpoints"]


def test_an_over_large_upload_is_refused(studio, client):
    big = studio.root / "big.jsonl"
    write_jsonl(big, toy_rows(2000))
    assert big.stat().st_size > UPLOAD_LIMIT_MB * 2**20
    before = snapshot(studio)
    with open(big, "rb") as f:
        answer = httpx.post(studio.url + "/gradio_api/upload", files={"files": ("big.jsonl", f)}, timeout=30)
    assert answer.status_code == 413 and "maximum allowed size" in answer.text
    assert snapshot(studio) == before


def test_the_studio_page_and_plain_clients_still_work(studio, client):
    page = httpx.get(studio.url + "/", headers={"Origin": studio.url}, timeout=30)
    assert page.status_code == 200
    assert httpx.get(f"http://localhost:{studio.url.rsplit(':', 1)[1]}/gradio_api/info", timeout=30).status_code == 200
    queued = client.predict(studio.spec(), "fine", 0, api_name="/launch")  # the same spec, confined, is accepted
    assert Path(queued["run_dir"]).parent == studio.home / "runs"
    assert client.predict(queued["id"], api_name="/cancel")["status"] == "cancelled"
    assert client.predict(queued["id"], False, api_name="/delete_job") == []


def test_deleting_removes_only_what_the_studio_wrote(studio, client):
    store = JobStore(studio.home)
    folder = studio.home / "runs" / "mixed"
    jid = store.submit(studio.spec(), name="mixed", run_dir=str(folder)).id
    make_marked_folder(folder, {"job": jid})
    write_json_atomic(folder / "run.json", {"status": "failed"})
    (folder / "log.txt").write_text("log\n", encoding="utf-8")
    (folder / "notes.txt").write_text("the user's own notes\n", encoding="utf-8")
    (folder / ".canary").write_text("hidden canary\n", encoding="utf-8")
    os.symlink(studio.outside / "canary.txt", folder / "checkpoints")
    store.cancel(jid)
    removed = client.predict(jid, True, api_name="/delete_job")
    assert sorted(Path(r).name for r in removed) == ["log.txt", "run.json"]
    assert sorted(x.name for x in folder.iterdir()) == [".canary", MARKER, "checkpoints", "notes.txt"]
    assert (studio.outside / "canary.txt").read_text() == "outside canary\n"


def test_failed_logins_wait_longer_each_time():
    import asyncio

    from studio.ui.guard import LOGIN_DELAY_CAP, slow_login

    waits = []

    async def record(seconds):
        waits.append(seconds)

    login = slow_login("ann", "secret", sleep=record)
    results = [asyncio.run(login("ann", guess)) for guess in ("a", "b", "c", "secret")]
    assert results == [False, False, False, True] and waits == sorted(waits) and waits[0] < waits[-1]
    assert login.failures == 0
    for _ in range(20):
        asyncio.run(login("ann", "x"))
    assert waits[-1] == LOGIN_DELAY_CAP


def test_job_processes_do_not_inherit_the_password(monkeypatch):
    from jobs.home import AUTH_ENV
    from jobs.runner.worker import job_environment

    monkeypatch.setenv(AUTH_ENV, "ann:secret")
    assert AUTH_ENV not in job_environment() and "PATH" in job_environment()


def test_two_jobs_never_share_an_export_archive(studio):
    from studio.ui.common import Studio
    from studio.ui.export import archive_path

    s = Studio.at(studio.home, str(studio.model))
    store = JobStore(studio.home)
    a, b = (store.submit(studio.spec(), name="same name", run_dir=str(studio.root / d / "run1")) for d in "ab")
    assert archive_path(s, a, "merged") != archive_path(s, b, "merged")
    assert archive_path(s, a, "merged") == archive_path(s, store.get(a.id), "merged")


def test_operator_flags_widen_exactly_what_they_name(tmp_path):
    from jobs.confine import Policy
    from adapters.core.errors import StudioError
    from jobs.home import studio_home

    home, extra = studio_home(tmp_path / "home"), tmp_path / "extra"
    extra.mkdir()
    spec = {"model": str(extra / "model"), "dataset": {"path": str(extra / "d.jsonl")}, "output_dir": str(extra / "run"),
            "trust_remote_code": True, "training": {"nnodes": 2, "node_rank": 0, "rdzv_endpoint": "node0:29500"}}
    wide = Policy(home, allow_paths=(extra.resolve(),), allow_remote_code=True, allow_multi_node=True)
    out = wide.check_spec(spec, output_dir_given=True)
    assert out["output_dir"] == str((extra / "run").resolve()) and out["dataset"]["path"] == str(extra / "d.jsonl")
    for flag, change in (("--allow-remote-code", {"allow_remote_code": False}),
                         ("--allow-multi-node", {"allow_multi_node": False}), ("--allow-path", {"allow_paths": ()})):
        narrower = Policy(**{**wide.__dict__, **change})
        with pytest.raises(StudioError, match=flag):
            narrower.check_spec(spec, output_dir_given=True)
    assert Policy.open(home).check_spec(spec, output_dir_given=True) == spec  # the command line names anything


def test_dataset_folders_follow_the_same_rule(tmp_path):
    from adapters.core.errors import StudioError
    from jobs.home import studio_home
    from studio.datasets_store import DatasetStore

    store = DatasetStore(studio_home(tmp_path / "home"))
    outside = write_jsonl(tmp_path / "mine.jsonl", toy_rows(10))
    kept = store.add(outside, "kept")
    (Path(kept.file).parent / "notes.txt").write_text("the user's\n", encoding="utf-8")
    store.delete("kept")  # the studio's files go, the user's file and its folder stay
    assert sorted(p.name for p in Path(kept.file).parent.iterdir()) == [MARKER, "notes.txt"]
    # A hand-written entry pointing out of its folder is no dataset; one without a marker is not deleted.
    forged = store.root / "forged"
    forged.mkdir()
    (forged / "dataset.json").write_text(json.dumps({"id": "forged", "name": "forged", "file": str(outside),
                                                     "format": "instruction", "rows": 10}), encoding="utf-8")
    assert "forged" not in [e.name for e in store.list()]
    unmarked = store.add(outside, "unmarked")
    (Path(unmarked.file).parent / MARKER).unlink()
    with pytest.raises(StudioError, match="not made by this studio"):
        store.delete("unmarked")
    assert Path(unmarked.file).is_file() and outside.is_file()
