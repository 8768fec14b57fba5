"""The studio in headless Chromium, as a user drives it: upload a dataset (and a broken one),
launch two jobs from the Train tab, watch them finish, reload the page, compare the runs,
and download the merged model, which plain transformers then loads.

Skipped only on a machine without /usr/bin/chromium outside CI; in CI a missing browser
is a failure (``.ci/run`` installs it).
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import pytest
from helpers import CHROMIUM, el, running_studio, toy_rows, write_jsonl

SHOTS = os.environ.get("STUDIO_SCREENSHOTS")  # a folder to keep screenshots of each step in
pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must install chromium (see .ci/run)")
        pytest.skip(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with running_studio(tmp_path_factory.mktemp("browser")) as s:
        yield s


def shot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"), full_page=True)


def choose(page, elem_id: str, option: str) -> None:
    el(page, elem_id, "input").click()
    page.get_by_role("option", name=option).first.click()


def fill(page, elem_id: str, value) -> None:
    box = el(page, elem_id, "input, textarea").first
    box.fill(str(value))
    box.press("Tab")


def test_upload_train_compare_and_download_in_the_browser(studio, page, tmp_path):
    from playwright.sync_api import expect
    from transformers import AutoModelForCausalLM

    page.goto(studio["url"])
    # Datasets: a good upload is stored and previewed; a broken one shows its error and stores nothing.
    fill(page, "datasets.name", "counting")
    el(page, "datasets.upload", "input[type=file]").set_input_files(
        str(write_jsonl(tmp_path / "numbers.jsonl", toy_rows(40))))
    expect(el(page, "datasets.status")).to_contain_text("Stored 'counting': 40 rows, format instruction")
    # The first preview waits for the model process to start (the web process loads no tokenizer).
    expect(el(page, "datasets.preview", ".ds-text .tok-trained").first).to_contain_text("the answer is",
                                                                                         timeout=120_000)
    expect(el(page, "datasets.table")).to_contain_text("counting")
    stored = sorted(p.name for p in (studio["home"] / "datasets").iterdir())

    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n', encoding="utf-8")
    fill(page, "datasets.name", "broken")
    el(page, "datasets.upload", "input[type=file]").set_input_files(str(bad))
    error = el(page, "datasets.status", ".studio-msg-error")
    expect(error).to_contain_text("broken.jsonl, line 2")
    expect(error).to_contain_text("missing field 'output'")
    expect(error).not_to_contain_text("Traceback")
    assert sorted(p.name for p in (studio["home"] / "datasets").iterdir()) == stored
    expect(el(page, "datasets.table")).not_to_contain_text("broken")
    shot(page, "1-datasets")

    # Train: two small runs that differ in LoRA rank, launched from the form.
    page.get_by_role("tab", name="Train").click()
    choose(page, "train.dataset", "counting")
    for field, value in (("max_steps", 6), ("batch_size", 8), ("max_seq_len", 64), ("eval_every", 0)):
        fill(page, f"train.training.{field}", value)
    page.get_by_text("More training settings").click()
    for field, value in (("exact_match_rows", 4), ("eval_samples", 1), ("max_new_tokens", 8)):
        fill(page, f"train.training.{field}", value)
    expect(el(page, "train.estimate")).to_contain_text(re.compile("Spec is valid|fits|tight|does not fit"))
    shot(page, "2-train")
    for name, rank in (("rank-8", 8), ("rank-4", 4)):
        page.get_by_role("tab", name="Train").click()
        fill(page, "train.method.lora.r", rank)
        fill(page, "train.name", name)
        el(page, "train.launch").click()
        expect(el(page, "train.status")).to_contain_text(f"({name}) is queued")
        expect(page.get_by_role("tab", name="Jobs")).to_have_attribute("aria-selected", "true")

    # Jobs: the page follows the last launched job until both have finished.
    head = el(page, "jobs.status")
    expect(head).to_contain_text("rank-4")
    expect(head).to_contain_text("completed", timeout=180_000)
    expect(el(page, "jobs.table")).not_to_contain_text("running")
    expect(el(page, "jobs.table")).not_to_contain_text("queued")
    expect(el(page, "jobs.table")).to_contain_text("completed")
    expect(el(page, "jobs.log", "textarea")).to_have_value(re.compile(r"job 2 completed"))
    shot(page, "3-jobs")

    # A reload re-attaches to the job this browser was watching.
    page.reload()
    page.get_by_role("tab", name="Jobs").click()
    expect(el(page, "jobs.status")).to_contain_text("#2 rank-4")
    expect(el(page, "jobs.status")).to_contain_text("100%")

    # Compare: both runs in one table, their specs differing in the LoRA rank.
    page.get_by_role("tab", name="Compare").click()
    choose(page, "compare.runs", "#1 rank-8 (completed)")
    choose(page, "compare.runs", "#2 rank-4 (completed)")
    el(page, "compare.go").click()
    expect(el(page, "compare.table")).to_contain_text("#2 rank-4")
    expect(el(page, "compare.table")).to_contain_text("#1 rank-8")
    expect(el(page, "compare.diff")).to_contain_text("method.r")
    shot(page, "4-compare")

    # Export: the merged model as a zip, loadable with plain transformers.
    page.get_by_role("tab", name="Export").click()
    choose(page, "export.run", "#1 rank-8 (completed)")
    expect(el(page, "export.info")).to_contain_text("standalone safetensors folder")
    el(page, "export.merged").click()
    expect(el(page, "export.status")).to_contain_text("Wrote", timeout=120_000)
    link = el(page, "export.file", "a").first
    with page.expect_download() as download:
        link.click()
    archive = tmp_path / "merged.zip"
    download.value.save_as(archive)
    shot(page, "5-export")
    with zipfile.ZipFile(archive) as z:
        z.extractall(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(next((tmp_path / "merged").iterdir()))
    assert model.config.num_hidden_layers == 2 and not any("lora" in n for n, _ in model.named_parameters())
