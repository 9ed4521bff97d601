# Two entry points: `make demo` and `make test`. Each builds .venv on first use from the lock file,
# so every fresh clone gets exactly the versions CI tested.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned: this version resolves to a local CPU build here; an unpinned torch pulls GBs of CUDA wheels.
TORCH_PIN := torch==2.13.0
# Megatron-Core, test-only: tests/test_io_megatron.py writes traces with Megatron's own RouterTracer. Its
# releases that have the tracer (0.19+) declare Python >= 3.12 yet ship cp311 wheels, and the tracer needs only
# torch, numpy and packaging; so it is installed apart from the lock, without dependencies.
MEGATRON_PIN := megatron-core==0.19.2
# Exact versions of every package, transitive ones included (`make lock` writes it).
LOCK := requirements-lock.txt
STAMP := $(VENV)/.installed
# A throw-away environment with the newest versions pyproject.toml allows (torch stays pinned).
LATEST := .venv-latest

.PHONY: demo test test-slow test-slow-ci test-compile-full test-latest lock bench install gpu-check

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python $(MEGATRON_PIN)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/moetrace demo --out demo_out

# PYTHONSAFEPATH: the repository root is not put on sys.path, so the folders engine/ and kernels/
# are never imported by those names (moetrace is installed: moetrace <- engine/, moetrace.kernels
# <- kernels/), and a `kernels` that transformers imports is Hugging Face's, never ours.
# HYPOTHESIS_PROFILE=ci: property tests run derandomized (the same examples on every machine;
# tests/conftest.py). Leave it out to let Hypothesis search at random.
test: $(STAMP)
	HYPOTHESIS_PROFILE=ci PYTHONSAFEPATH=1 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	HYPOTHESIS_PROFILE=ci PYTHONSAFEPATH=1 $(BIN)/python -m pytest -q -m slow

# The slow tests that fit CI's budget beside `make test` (.ci/run runs both; times in bench/RESULTS.md).
test-slow-ci: $(STAMP)
	HYPOTHESIS_PROFILE=ci PYTHONSAFEPATH=1 $(BIN)/python -m pytest -q -m 'slow and not long'

# Every combination of routing options compiled for sm_80 and sm_90 (the slow suite compiles a
# covering design of them): hours on 2 cores, run once per kernel change; bench/RESULTS.md.
test-compile-full: $(STAMP)
	PYTHONSAFEPATH=1 $(BIN)/python -m pytest -q -m compile_full tests/test_triton_compile.py

# Build $(LATEST) from scratch with the newest allowed versions and run the suite there: an
# upcoming release that breaks moetrace shows here before users hit it.
$(LATEST)/.installed: pyproject.toml setup.py
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install --quiet $(TORCH_PIN)
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]' $(TORCH_PIN)
	$(LATEST)/bin/python -m pip install --quiet --no-deps --ignore-requires-python $(MEGATRON_PIN)
	touch $@

test-latest:
	rm -f $(LATEST)/.installed $(LATEST)/.tested
	$(MAKE) $(LATEST)/.installed
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(torch|transformers|triton|numba|numpy|zarr|xarray)=='
	HYPOTHESIS_PROFILE=ci PYTHONSAFEPATH=1 $(LATEST)/bin/python -m pytest -q
	touch $(LATEST)/.tested

# Re-lock to the set `make test-latest` just tested and passed: every package, exact versions.
lock:
	@test -f $(LATEST)/.tested || { echo "make lock: run 'make test-latest' first (it must pass)"; exit 2; }
	{ echo "# Exact, complete set of versions that CI and every fresh clone install (CPU build of torch)."; \
	  echo "# Produced by \`make lock\` from the environment \`make test-latest\` tested (newest versions"; \
	  echo "# pyproject.toml allows, torch pinned). Library users get the ranges in pyproject.toml."; \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable | grep -v -e '^wheel==' -e '^megatron-core==' \
	    | sed 's/+cpu$$//'; \
	} > $(LOCK)

# Quick pytest-benchmark pass over the hot paths; the full-size scripts are listed in the README.
bench: $(STAMP)
	PYTHONSAFEPATH=1 $(BIN)/python -m pytest bench/test_benchmarks.py --benchmark-only -q

# On a CUDA machine: the routing kernel natively, its bandwidth, masking, capture and compile
# (bench/gpu_check.py). Installs nothing: PYTHON is the machine's Python with CUDA torch and Triton.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONSAFEPATH=1 $(GPU_PYTHON) bench/gpu_check.py --out bench/gpu_check.md
