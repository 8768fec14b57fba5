"""The web process holds no model: after every tab's endpoint and page handler has run, torch,
transformers, peft and bitsandbytes were never imported into it.

The studio runs in a process of its own (this test process imports torch itself), driven
with gradio_client exactly as bench/web_memory.py drives it on SmolLM2.
"""
from __future__ import annotations

import pytest
from helpers import build_tiny_llama, toy_rows, write_jsonl

from bench.web_memory import HEAVY, Served, drive

pytestmark = pytest.mark.timeout(600)


def test_every_endpoint_leaves_the_web_process_without_torch(tmp_path):
    model = str(build_tiny_llama(tmp_path / "tiny-llama"))
    data = write_jsonl(tmp_path / "numbers.jsonl", toy_rows(40))
    served = Served(tmp_path / "home", model)
    steps = []
    try:
        result = drive(served, model, data, steps.append)
        final = served.ask("report")
    finally:
        served.stop()
    assert steps[-1] == "retry_cancel_resume_delete"
    assert result["estimate"]["available"] and result["outputs"] == 2
    assert result["page"]["preview_rows"] > 0 and result["page"]["can_merge"]
    assert final["heavy_count"] == 0, f"imported into the web process: {final['heavy_modules']}"
    assert set(HEAVY) == {"torch", "transformers", "peft", "bitsandbytes"}
