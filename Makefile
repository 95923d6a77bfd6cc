# Two entry points a new user needs: `make demo` (the main job) and `make test` (the whole suite).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= data

.PHONY: venv demo test lint typecheck pytest bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and by exact pin: the CPU build is what the project is tested with.
	$(PY) -m pip install -q 'torch==2.13.0'
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m tools.sample $(DATA)/sample-src --size-mb 300
	$(PY) -m tools.ingest $(DATA)/sample-src $(DATA)/sample-store --overwrite
	$(PY) -m tools.inspect $(DATA)/sample-store --verify

lint: venv
	$(VENV)/bin/ruff check hpstore trainer tools tests benchmarks
	$(VENV)/bin/ruff format --check hpstore trainer tools tests benchmarks

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv
	$(PY) -m pytest

test: lint typecheck pytest

bench: venv
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(DATA)
