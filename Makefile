# Two entry points: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this version resolves to a local CPU build; an unpinned torch pulls GBs of CUDA wheels.
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench install

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(TORCH_PIN)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moetrace demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Quick pytest-benchmark pass over the hot paths; the full-size scripts are listed in the README.
bench: $(STAMP)
	$(BIN)/python -m pytest bench/test_benchmarks.py --benchmark-only -q
