# One entry point for people and CI. `make demo` and `make test` set everything up first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned: a bare `torch` may pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: setup demo test test-fast lint typecheck bench clean

$(VENV)/.installed: pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev,torch]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fedcell simulate examples/hello-pytorch/job.py -n 2

test: setup
	$(PY) -m ruff check fedcell tests benchmarks examples
	$(PY) -m mypy fedcell/transports
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) benchmarks/stream.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
