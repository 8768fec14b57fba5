"""The studio's named endpoints, driven with gradio_client against the real app: a tiny
model trains in job processes started by the app's own scheduler."""
from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest
from helpers import free_port, running_studio, toy_rows, write_jsonl

pytestmark = pytest.mark.timeout(420)

FINISHED = {"completed", "failed", "cancelled", "interrupted"}


def tiny_spec(model: Path, dataset: str, **training) -> dict:
    t = {"max_steps": 6, "batch_size": 8, "max_seq_len": 64, "eval_samples": 1, "exact_match_rows": 4,
         "max_new_tokens": 8, "lr_schedule": "constant"}
    t.update(training)
    return {"model": str(model), "dataset": {"path": dataset, "eval_fraction": 0.2},
            "method": {"name": "lora", "r": 4}, "optimizer": {"name": "adamw", "lr": 1e-2}, "training": t}


def wait_for(client, job_id: int, statuses=FINISHED, timeout: float = 180.0, step: int | None = None) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = client.predict(job_id, api_name="/job_status")
        if s["status"] in statuses and (step is None or (s["step"] or 0) >= step):
            return s
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {s['status']} after {timeout} s; log:\n{s['log']}")


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with running_studio(tmp_path_factory.mktemp("ui-api")) as s:
        yield s


@pytest.fixture(scope="module")
def client(studio):
    from gradio_client import Client

    return Client(studio["url"], verbose=False)


@pytest.fixture(scope="module")
def numbers(client, tmp_path_factory) -> str:
    """A stored dataset the jobs train on, referenced by name in their specs."""
    from gradio_client import handle_file

    path = write_jsonl(tmp_path_factory.mktemp("data") / "numbers.jsonl", toy_rows(40))
    return client.predict(handle_file(str(path)), "numbers", api_name="/upload_dataset")["name"]


def test_uploads_are_validated_and_a_bad_one_stores_nothing(studio, client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    good = write_jsonl(tmp_path / "counting.jsonl", toy_rows(40))
    entry = client.predict(handle_file(str(good)), "", api_name="/upload_dataset")
    assert entry["name"] == "counting" and entry["format"] == "instruction" and entry["rows"] == 40
    assert Path(entry["file"]).is_relative_to(studio["home"] / "datasets")

    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    before = sorted(p.name for p in (studio["home"] / "datasets").iterdir())
    with pytest.raises(AppError) as err:
        client.predict(handle_file(str(bad)), "broken", api_name="/upload_dataset")
    assert "broken.jsonl, line 2" in str(err.value) and "'output'" in str(err.value)
    assert sorted(p.name for p in (studio["home"] / "datasets").iterdir()) == before
    names = [d["name"] for d in client.predict(api_name="/list_datasets")]
    assert names[0] == "demo (bundled)" and "counting" in names and "broken" not in names


def test_estimate_validates_before_launch(studio, client):
    from gradio_client.exceptions import AppError

    ok = client.predict(tiny_spec(studio["model"], "demo"), "cpu", api_name="/estimate")
    assert ok["valid"] and ok["device_bytes"] > 0
    if ok["available"]:
        assert ok["verdict"] in ("fits", "tight", "does not fit") and ok["total_bytes"] > 0
    bad = tiny_spec(studio["model"], "demo")
    bad["method"]["r"] = 0
    with pytest.raises(AppError, match=r"method\.r"):
        client.predict(bad, "cpu", api_name="/estimate")
    with pytest.raises(AppError, match="gradient checkpointing|grad_accum|unknown key"):
        client.predict({**bad, "method": {"name": "lora"}, "training": {"max_stepz": 3}}, "cpu",
                       api_name="/estimate")
    assert client.predict(api_name="/list_jobs") == []  # nothing was queued by checking


def test_launch_train_compare_generate_export(studio, client, numbers, tmp_path):
    from transformers import AutoModelForCausalLM

    first = client.predict(tiny_spec(studio["model"], numbers), "r4", 0, api_name="/launch")
    second_spec = tiny_spec(studio["model"], numbers)
    second_spec["method"]["r"] = 8
    second = client.predict(second_spec, "r8", 0, api_name="/launch")
    assert first["status"] == "queued" and first["name"] == "r4"
    listed = {j["id"]: j for j in client.predict(api_name="/list_jobs")}
    assert {first["id"], second["id"]} <= set(listed)

    done = [wait_for(client, j["id"]) for j in (first, second)]
    for s in done:
        assert s["status"] == "completed", s["log"]
        assert s["progress"] == 1.0 and s["step"] == 6
        assert [p["step"] for p in s["curve"] if p["series"] == "train"] == [1, 2, 3, 4, 5, 6]
        assert any(p["series"] == "eval" for p in s["curve"]) and "job" in s["log"]

    compared = client.predict([first["id"], second["id"]], api_name="/compare")
    assert [r["id"] for r in compared["runs"]] == [first["id"], second["id"]]
    assert all(r["trainable_params"] and r["eval_loss"] is not None for r in compared["runs"])
    diff = {row["field"] for row in compared["spec_diff"]}
    assert "method.r" in diff and "model" not in diff
    assert {p["series"].split()[-1] for p in compared["curves"]} == {"train", "eval"}

    outputs = client.predict("what is 3 plus 1 ?", [first["id"]], True, "", 6, 0.0, api_name="/generate")
    assert [o["label"].split(":")[0] for o in outputs] == ["base", f"#{first['id']} r4"]
    assert all(isinstance(o["output"], str) for o in outputs)

    merged_zip = Path(client.predict(first["id"], api_name="/export_merged"))
    with zipfile.ZipFile(merged_zip) as z:
        z.extractall(tmp_path / "merged")
    folder = next((tmp_path / "merged").iterdir())
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert not any("lora" in n for n, _ in model.named_parameters())
    archives = sorted(p.name for p in (studio["home"] / "exports").iterdir())
    assert archives == [merged_zip.name]  # written inside the studio home, no work folders left

    adapter_zip = Path(client.predict(first["id"], api_name="/export_adapter"))
    with zipfile.ZipFile(adapter_zip) as z:
        assert any(n.endswith("adapter_config.json") for n in z.namelist())


def test_cancel_and_resume_a_waiting_job(studio, client, numbers):
    from gradio_client.exceptions import AppError

    # One CPU slot: the second job waits while the first trains.
    running = client.predict(tiny_spec(studio["model"], numbers, max_steps=400), "long", 0, api_name="/launch")
    waiting = client.predict(tiny_spec(studio["model"], numbers), "waits", 0, api_name="/launch")
    assert client.predict(waiting["id"], api_name="/cancel")["status"] == "cancelled"
    with pytest.raises(AppError, match="already cancelled"):
        client.predict(waiting["id"], api_name="/cancel")
    assert client.predict(waiting["id"], api_name="/resume")["status"] == "queued"
    assert client.predict(waiting["id"], api_name="/cancel")["status"] == "cancelled"

    wait_for(client, running["id"], statuses={"running"}, step=1, timeout=120)
    asked = client.predict(running["id"], api_name="/cancel")
    assert asked["cancel_requested"] or asked["status"] == "cancelled"
    stopped = wait_for(client, running["id"], timeout=90)
    assert stopped["status"] == "cancelled" and 1 <= stopped["step"] < 400
    removed = client.predict(running["id"], True, api_name="/delete_job")
    assert removed == [stopped["run_dir"]] and not Path(stopped["run_dir"]).exists()
    assert running["id"] not in [j["id"] for j in client.predict(api_name="/list_jobs")]
