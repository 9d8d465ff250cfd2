# linewatch: the two commands that matter are `make demo` and `make test`. Both set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PEERS_VENV ?= .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed-stamp
export MPLBACKEND := Agg

.PHONY: install peers demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# alibi-detect needs numpy<2 and is BSL-licensed: it lives in its own venv and only bench_spc calls it, in a subprocess
$(PEERS_STAMP):
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q -c constraints.txt "alibi-detect==0.13.0" torch
	@touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)  ## the peer online drift detectors of bench_spc (alibi-detect), in .venv-peers

demo: install  ## the main job end to end on embedded defaults (local SQLite MLflow, local Prefect)
	$(VENV)/bin/linewatch demo

lint: install
	$(VENV)/bin/ruff check models pipeline flows tests benchmarks

test: install lint  ## the whole suite (CI runs this; the slowest tests are listed at the end, for the 25-minute budget)
	$(VENV)/bin/pytest -q --timeout=900 --durations=25 --ignore=tests/stack $(PYTEST_ARGS)
	@# the stack tests talk to real servers: own process, so no in-process Prefect test server or events worker leaks in
	$(VENV)/bin/pytest -q --timeout=900 tests/stack $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow and not stack" $(PYTEST_ARGS)

bench: install peers  ## regenerate benchmarks/results/*.md and docs/results.md (long: tens of minutes on 2 cores)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,bench]'
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(PEERS_VENV) .pytest_cache .ruff_cache build *.egg-info
