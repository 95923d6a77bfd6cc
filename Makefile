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

# The main job on a built-in default: make a sample dataset, ingest it, verify it, and train the
# CNN on it for a short run on two processes (DDP over gloo) with write-behind checkpoints.
demo: venv
	$(PY) -m tools.sample $(DATA)/sample-src --size-mb 300
	$(PY) -m tools.ingest $(DATA)/sample-src $(DATA)/sample-store --overwrite
	$(PY) -m tools.inspect $(DATA)/sample-store --verify
	rm -rf $(DATA)/ckpt $(DATA)/metrics.jsonl
	$(VENV)/bin/torchrun --standalone --nproc-per-node 2 -m trainer --data $(DATA)/sample-store \
		--model cnn --epochs 1 --max-steps 300 --batch-size 128 --log-every 50 \
		--ckpt $(DATA)/ckpt --ckpt-every 100 --metrics $(DATA)/metrics.jsonl

lint: venv
	$(VENV)/bin/ruff check hpstore trainer tools tests benchmarks
	$(VENV)/bin/ruff format --check hpstore trainer tools tests benchmarks

typecheck: venv
	$(VENV)/bin/mypy

# Two test processes, one test file each at a time: most of the suite's wall time is subprocesses
# importing torch and waiting on each other (torchrun jobs, S3 round trips), which the second
# process overlaps; a file's module-scoped fixtures stay in one process.
PYTEST_WORKERS ?= 2

pytest: venv
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

test: lint typecheck pytest

bench: venv
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) $(DATA)
