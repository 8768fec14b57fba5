"""The bundled model's cache: fp32 whatever dtype a run asks for, plus a copy per other dtype."""
import shutil

import torch
from transformers import AutoModelForCausalLM

from jobs.training import models

REF = "example-org/tiny-bundled"


def test_cache_is_fp32_and_a_bf16_copy_is_mapped_next_time(tiny_model, studio_home):
    fp32_dir = models.cache_dir_for(REF)
    shutil.copytree(tiny_model, fp32_dir)
    src = models.resolve(REF)
    assert src.kind == "bundled-cache" and models.stored_dtype(src.path) == torch.float32
    assert models.weights_for(src, torch.bfloat16) == src  # no copy yet: this run converts

    first = models.load_model(src, torch.bfloat16)
    copy = models.cache_dir_for(REF, torch.bfloat16)
    assert models.stored_dtype(copy) == torch.bfloat16
    assert models.stored_dtype(fp32_dir) == torch.float32  # the fp32 cache is untouched
    assert models.weights_for(src, torch.bfloat16).path == str(copy)
    assert models.weights_for(src, torch.float32) == src

    again = models.load_model(src, torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(torch.bfloat16)
    for (name, a), b, c in zip(reference.state_dict().items(), first.state_dict().values(),
                               again.state_dict().values()):
        assert a.dtype == b.dtype == c.dtype == torch.bfloat16, name
        assert torch.equal(a, b) and torch.equal(a, c), name  # exactly what converting gives


def test_a_cache_in_the_wrong_dtype_is_not_used_as_fp32(tiny_model, studio_home):
    # An older version wrote the cache in whatever dtype the first run used.
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(models.cache_dir_for(REF))
    assert models.stored_dtype(models.cache_dir_for(REF)) == torch.bfloat16
    assert models.resolve(REF).kind == "hub"  # not "bundled-cache": it would be converted again


def test_stored_dtype_of_folders_without_one_safetensors_file(tmp_path):
    assert models.stored_dtype(tmp_path) is None
    (tmp_path / "model.safetensors").write_bytes(b"\x05")  # truncated header
    assert models.stored_dtype(tmp_path) is None
