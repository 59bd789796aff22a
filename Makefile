# Two entry points: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv and install what is needed (torch pinned to the CPU build).
PY := .venv/bin/python
TORCH := torch==2.13.0

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

.PHONY: setup demo test lint
setup: .venv/.installed

# The demo replaces runs/quickstart from an earlier demo.
demo: setup
	$(PY) -m scripts.quickstart --overwrite

test: setup
	$(PY) -m pytest -q -m "not gpu"

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
