# Set-up and the two commands of the README.
#   make run   -> creates .venv if needed, then runs the main job (configs/phonons.yaml):
#                 search -> stack -> register @champion -> predict the held-out structures
#   make test  -> creates .venv if needed, then runs the whole test suite
#   make lint  -> ruff: lint and format check (CI runs it before the tests)
# The venv is built once; a second `make` only re-installs when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.matfusion-installed
CONFIG ?= configs/phonons.yaml
PYTEST_ARGS ?=

.PHONY: setup run smoke test test-fast lint benchmark-featurize clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# 1. torch first: the pinned CPU wheel (an unpinned torch pulls a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	# 2. matbench without its ancient pins (works with matminer 0.10.x; `pip check` complains: expected)
	$(PIP) install -q --no-deps matbench==0.6
	# 3. the project itself, editable, with the test extra and the chgnet extra (its descriptor set's tests)
	$(PIP) install -q -e ".[test,chgnet]"
	touch $(STAMP)

run: setup
	$(VENV)/bin/matfusion search $(CONFIG)

smoke: setup
	$(VENV)/bin/matfusion search configs/smoke.yaml

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

benchmark-featurize: setup
	$(PY) benchmarks/featurize.py

clean-venv:
	rm -rf $(VENV)
