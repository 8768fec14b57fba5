"""Uploaded datasets in the studio home: validated before anything is kept, renamed without
moving the file jobs use, refused deletion while a job waits on them, and the preview
that shows trained tokens apart from the prompt."""
from __future__ import annotations

import csv
import json

import pytest
from helpers import toy_rows, write_jsonl

from adapters.core.errors import StudioError
from jobs.runner.store import JobStore
from studio.datasets_store import DatasetStore


def stored_folders(home) -> list[str]:
    return sorted(p.name for p in (home / "datasets").iterdir())


def test_bundled_demo_is_listed_and_protected(studio_home):
    store = DatasetStore(studio_home)
    demo = store.list()[0]
    assert demo.bundled and demo.id == "demo" and demo.format == "instruction"
    assert demo.rows > 0 and demo.eval_rows > 0 and demo.eval_file.endswith("eval.jsonl")
    with pytest.raises(StudioError, match="bundled"):
        store.delete("demo")
    with pytest.raises(StudioError, match="bundled"):
        store.rename("demo (bundled)", "mine")


def test_upload_formats_are_detected_and_survive_a_restart(studio_home, tmp_path):
    store = DatasetStore(studio_home)
    jsonl = store.add(write_jsonl(tmp_path / "a.jsonl", toy_rows(12)))
    path = tmp_path / "b.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["prompt", "completion"])
        w.writeheader()
        w.writerows({"prompt": f"say {i}", "completion": str(i)} for i in range(5))
    table = store.add(path, "numbers as csv")
    assert (jsonl.name, jsonl.format, jsonl.rows) == ("a", "instruction", 12)
    assert (table.name, table.format, table.rows) == ("numbers as csv", "prompt_completion", 5)
    again = DatasetStore(studio_home)  # a new process sees the same list
    assert [e.name for e in again.list()[1:]] == ["a", "numbers as csv"]
    assert again.get("NUMBERS AS CSV").file == table.file
    assert store.add(write_jsonl(tmp_path / "a.jsonl", toy_rows(3))).name == "a (2)"


@pytest.mark.parametrize("content, expected", [
    ('{"instruction": "x", "output": "y"}\n{"instruction": "z"}\n', "line 2"),
    ('{"text": "ok"}\nnot json\n', "invalid JSON"),
    ('{"question": "?"}\n', "no row format matches"),
    ("", "no rows"),
])
def test_a_bad_upload_stores_nothing_and_names_the_users_file(studio_home, tmp_path, content, expected):
    store = DatasetStore(studio_home)
    before = stored_folders(studio_home)
    bad = tmp_path / "mine.jsonl"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(StudioError) as err:
        store.add(bad)
    assert expected in err.value.message and "mine.jsonl" in err.value.message
    assert "staging" not in err.value.message
    assert stored_folders(studio_home) == before
    with pytest.raises(StudioError, match="unsupported file type '.txt'"):
        store.add(bad.rename(tmp_path / "mine.txt"))


def test_rename_keeps_the_file_and_delete_waits_for_jobs(studio_home, tmp_path, tiny_model):
    store = DatasetStore(studio_home)
    entry = store.add(write_jsonl(tmp_path / "toy.jsonl", toy_rows(10)), "toy")
    renamed = store.rename("toy", "  counting   task ")
    assert renamed.name == "counting task" and renamed.file == entry.file
    store.add(write_jsonl(tmp_path / "other.jsonl", toy_rows(4)), "other")
    with pytest.raises(StudioError, match="already exists"):
        store.rename("counting task", "Other")
    spec = {"model": str(tiny_model), "dataset": {"path": entry.file}, "output_dir": str(tmp_path / "run")}
    job = JobStore(studio_home).submit(spec, name="uses it")
    with pytest.raises(StudioError, match=f"#{job.id}"):
        store.delete("counting task")
    JobStore(studio_home).cancel(job.id)
    store.delete("counting task")
    assert "counting task" not in [e.name for e in store.list()]
    assert json.loads((studio_home / "datasets" / "other" / "dataset.json").read_text())["name"] == "other"


@pytest.mark.slow
def test_preview_marks_trained_tokens_and_measures_lengths(studio_home, tmp_path, tiny_model):
    from studio.ui.common import Studio
    from studio.ui.datasets import preview, preview_html

    studio = Studio.at(studio_home, str(tiny_model))
    store = DatasetStore(studio_home)
    store.add(write_jsonl(tmp_path / "toy.jsonl", toy_rows(30)), "toy")
    data = preview(studio, "toy", "", 64)
    assert data["format"] == "instruction" and len(data["rows"]) == 3 and len(data["lengths"]) == 30
    first = data["rows"][0]
    trained = "".join(text for text, flag in first["spans"] if flag)
    prompt = "".join(text for text, flag in first["spans"] if not flag)
    assert "answer is 1" in trained and "what is 0 plus 1" in prompt and "answer" not in prompt
    assert data["over_max_seq_len"] == 0
    assert preview(studio, "toy", "", 20)["over_max_seq_len"] == sum(n > 20 for n in data["lengths"]) > 0
    with pytest.raises(StudioError, match="max_seq_len=8 leaves no trained tokens"):
        preview(studio, "toy", "", 8)
    page = preview_html(data)
    assert page.count('class="ds-row"') == 3 and "tok-trained" in page and "&lt;/s&gt;" in page
