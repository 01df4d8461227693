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
