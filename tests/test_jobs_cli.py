"""`studio jobs ...` end to end through the real command entry point."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml
from helpers import make_spec

from jobs.runfolder import make_marked_folder
from jobs.runner.scheduler import Scheduler
from jobs.runner.store import JobStore, Status
from studio.cli import main


def studio(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def spec_file(tmp_path, tiny_model, toy_dataset, monkeypatch):
    """A spec as a user writes it: relative dataset path, no output_dir, in the current folder."""
    monkeypatch.chdir(tmp_path)
    spec = make_spec(tiny_model, toy_dataset, Path("unused"), max_steps=3)
    del spec["output_dir"]
    spec["dataset"]["path"] = toy_dataset.name
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_bad_spec_is_refused_with_a_clear_error_and_nothing_stored(capsys, tmp_path, spec_file):
    home = tmp_path / "home"
    bad = spec_file.with_name("bad.yaml")
    bad.write_text(spec_file.read_text().replace("max_steps", "max_stepz"))
    code, out, err = studio(capsys, "jobs", "submit", bad, "--home", home)
    assert code == 2 and out == ""
    assert "bad.yaml" in err and "training.max_stepz: unknown key" in err and "Traceback" not in err
    code, _, err = studio(capsys, "jobs", "submit", tmp_path / "missing.yaml", "--home", home)
    assert code == 2 and "spec file not found" in err
    assert JobStore(home).list() == []


def test_submit_list_show_and_control(capsys, tmp_path, spec_file, monkeypatch):
    monkeypatch.setenv("STUDIO_HOME", str(tmp_path / "env-home"))
    home = tmp_path / "home"
    code, out, _ = studio(capsys, "jobs", "submit", spec_file, "--home", home, "--priority", "2",
                          "--set", "training.max_steps=5")
    assert code == 0
    jid = int(out.strip())
    job = JobStore(home).get(jid)
    assert job.name == "tiny" and job.priority == 2 and job.spec["training"]["max_steps"] == 5
    assert job.run_dir == str(home.resolve() / "runs" / str(jid))
    assert job.spec["dataset"]["path"] == str(tmp_path / "toy.jsonl")
    assert JobStore(tmp_path / "env-home").list() == []  # --home wins over STUDIO_HOME

    code, out, _ = studio(capsys, "jobs", "list", "--home", home)
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "NAME", "STATUS"]
    assert out.splitlines()[1].split()[:3] == [str(jid), "tiny", "queued"]
    _, out, _ = studio(capsys, "jobs", "list", "--json", "--home", home)
    assert [(j["id"], j["status"]) for j in json.loads(out)] == [(jid, "queued")]

    assert studio(capsys, "jobs", "cancel", jid, "--home", home)[1].strip() == f"job {jid}: cancelled"
    code, _, err = studio(capsys, "jobs", "cancel", jid, "--home", home)
    assert code == 2 and "already cancelled" in err
    assert "queued" in studio(capsys, "jobs", "resume", jid, "--home", home)[1]
    studio(capsys, "jobs", "cancel", jid, "--home", home)
    _, out, _ = studio(capsys, "jobs", "retry", jid, "--home", home)
    assert out.strip().endswith(f"runs/{jid}-attempt2")
    _, out, _ = studio(capsys, "jobs", "show", jid, "--json", "--home", home)
    shown = json.loads(out)
    assert shown["attempt"] == 2 and shown["status"] == "queued" and shown["log"].endswith("attempt2/log.txt")
    code, _, err = studio(capsys, "jobs", "show", 99, "--home", home)
    assert code == 2 and "no job with id 99" in err


@pytest.mark.slow
def test_run_follow_logs_and_delete_files(capsys, tmp_path, spec_file):
    home = tmp_path / "home"
    jid = int(studio(capsys, "jobs", "submit", spec_file, "--home", home)[1])
    stop = threading.Event()
    sched = Scheduler(home, gpus=[], poll_interval=0.1)
    thread = threading.Thread(target=sched.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        code, out, _ = studio(capsys, "jobs", "logs", jid, "--follow", "--home", home)  # returns when done
    finally:
        stop.set()
        thread.join(10)
    assert code == 0 and f"--- job {jid} completed ---" in out
    job = JobStore(home).get(jid)
    assert job.status == Status.COMPLETED

    _, out, _ = studio(capsys, "jobs", "show", jid, "--home", home)
    assert "completed" in out and "3/3" in out and job.run_dir in out
    code, _, err = studio(capsys, "jobs", "resume", jid, "--home", home)
    assert code == 2 and "retry" in err

    keep = Path(job.run_dir)
    assert studio(capsys, "jobs", "delete", jid, "--home", home)[0] == 0
    assert (keep / "run.json").is_file()  # files stay unless asked
    jid2 = int(studio(capsys, "jobs", "submit", spec_file, "--home", home, "--name", "second")[1])
    folder = Path(JobStore(home).get(jid2).run_dir)
    folder.mkdir(parents=True)  # by hand: not the studio's to delete
    (folder / "log.txt").write_text("x")
    code, _, err = studio(capsys, "jobs", "delete", jid2, "--files", "--home", home)
    assert code == 2 and "not made by this studio" in err and (folder / "log.txt").is_file()
    (folder / "log.txt").unlink()
    folder.rmdir()
    make_marked_folder(folder, {"job": jid2})  # as the job's start makes it
    (folder / "log.txt").write_text("x")
    _, out, _ = studio(capsys, "jobs", "delete", jid2, "--files", "--home", home)
    assert str(folder) in out and not folder.exists()
    assert JobStore(home).list() == []
