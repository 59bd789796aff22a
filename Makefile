# Every target creates .venv first (torch pinned to the CPU build) and runs inside it.
PY := .venv/bin/python
TORCH := torch==2.13.0

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-fast lint

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "Then run any job with .venv/bin/smallthinker COMMAND (.venv/bin/smallthinker --help lists them)."

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: .venv/.installed ## create .venv and install the package with its dev tools (CPU torch)

demo: setup ## the whole pipeline offline on a tiny model, into runs/quickstart (replaces an earlier demo)
	.venv/bin/smallthinker demo --overwrite

test: setup ## the test suite, slow tests included (CPU, no network)
	$(PY) -m pytest -q -m "not gpu"

test-fast: setup ## the test suite without the slow tests
	$(PY) -m pytest -q -m "not gpu and not slow"

lint: setup ## ruff lint and format check
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
