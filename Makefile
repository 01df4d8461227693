# Two commands do all set-up on a fresh machine:  `make bench`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test bench bench-quick fidelity speed clean

# torch is pinned to the CPU wheel (an unpinned torch pulls a multi-GB CUDA build); every other
# dependency is pinned in requirements.lock; pyproject.toml declares the tested ranges.
$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
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
