"""The model process the web process talks to: answers, the real cause of a failure, restarts,
and what the web process keeps instead of importing the methods (catalog, estimate cache)."""
from __future__ import annotations

import io
import json
import os

import pytest
from helpers import toy_rows, write_jsonl

from adapters import METHODS, UPDATE_RULES
from jobs.engine.server import serve
from adapters.core.errors import StudioError
from studio.catalog import load_catalog, model_from_schema
from studio.engine import Engine, EngineFailed
from studio.estimates import EstimateCache
from studio.ui.forms import bounds_text, classify


def exchange(*requests: dict) -> list[dict]:
    out = io.StringIO()
    serve(io.StringIO("".join(json.dumps(r) + "\n" for r in requests)), out, idle=0)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_the_protocol_answers_in_order_and_carries_the_cause():
    bad_spec = {"dataset": {"path": "x.jsonl"}, "method": {"name": "lora", "r": 0}, "output_dir": "o"}
    answers = exchange({"id": 1, "task": "validate", "args": {"data": bad_spec}},
                       {"id": 2, "task": "no-such-task"})
    assert [a["id"] for a in answers] == [1, 2]
    user = answers[0]["error"]
    assert user["studio"] and user["where"] == "spec" and "method.r" in user["what"] and user["fix"]
    other = answers[1]["error"]
    assert not other["studio"] and other["type"] == "ValueError" and "unknown task 'no-such-task'" in other["message"]


def test_an_engine_process_reports_errors_and_is_restarted_when_it_dies(tmp_path):
    engine = Engine(tmp_path, "forms", idle=60)
    try:
        with pytest.raises(StudioError, match=r"method\.r"):
            engine.call("validate", data={"dataset": {"path": "x"}, "method": {"name": "lora", "r": 0},
                                          "output_dir": "o"})
        with pytest.raises(EngineFailed, match="ValueError: unknown task"):
            engine.call("nothing")
        first = engine.pid
        engine.proc.kill()
        engine.proc.wait()
        resolved = engine.call("validate", data={"dataset": {"path": "x"}, "method": "lora", "output_dir": "o"})
        assert resolved["method"]["r"] == 8
        assert engine.pid != first
    finally:
        engine.close()


def test_an_idle_engine_exits_and_the_next_call_starts_another(tmp_path):
    engine = Engine(tmp_path, "playground", idle=0.5)
    try:
        assert engine.call("validate", data={"dataset": {"path": "x"}, "output_dir": "o"})["model"]
        first = engine.proc
        assert first.wait(timeout=60) == 0  # idle: it exits by itself, freeing what it held
        assert engine.call("validate", data={"dataset": {"path": "x"}, "output_dir": "o"})["model"]
        assert engine.proc is not first
    finally:
        engine.close()


def test_forms_rebuilt_from_the_catalog_match_every_config():
    for registry in (METHODS, UPDATE_RULES):
        for name, item in registry.items():
            rebuilt = model_from_schema(name, item.Config.model_json_schema())
            assert list(rebuilt.model_fields) == list(item.Config.model_fields), name
            for field, info in item.Config.model_fields.items():
                copy = rebuilt.model_fields[field]
                assert classify(copy.annotation) == classify(info.annotation), (name, field)
                assert bounds_text(copy) == bounds_text(info) and copy.description == info.description
                assert copy.get_default(call_default_factory=True) == info.get_default(call_default_factory=True)


def test_the_catalog_is_asked_once_per_code_version(tmp_path):
    from jobs.engine.tasks import catalog

    asked = []

    def ask(task):
        asked.append(task)
        return catalog()

    first = load_catalog(tmp_path, ask)
    second = load_catalog(tmp_path, ask)
    assert asked == ["catalog"]
    assert first.methods.names() == second.methods.names() == METHODS.names()
    assert second.rules.names() == UPDATE_RULES.names()
    assert second.methods.get("prefix").merge_blocker == METHODS.get("prefix").merge_blocker
    with pytest.raises(StudioError, match="unknown method 'nope'"):
        second.methods.get("nope")


def test_an_edited_dataset_is_estimated_again(tmp_path):
    data = write_jsonl(tmp_path / "rows.jsonl", toy_rows(10))
    cache = EstimateCache(tmp_path / "home")
    spec = {"model": "m", "dataset": {"path": str(data)}}
    key = cache.key(spec, "cpu")
    cache.put(key, {"available": True, "total_bytes": 1})
    assert cache.get(key) == {"available": True, "total_bytes": 1}
    assert cache.key(spec, "cuda:0") != key
    write_jsonl(data, toy_rows(12))
    os.utime(data, ns=(1, 1))
    assert cache.key(spec, "cpu") != key
