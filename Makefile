# One-command entry points for a fresh machine (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,data,parity,plots]"
	touch $(STAMP)

.PHONY: setup test test-slow demo bench
setup: $(STAMP)

## Set up the virtual environment and pass the test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

## Set up and run the main job on the embedded default data (sampler comparison on the exact
## Gaussian-mixture model until train.py lands).
demo: $(STAMP)
	$(PY) benchmarks/samplers.py --quick

## Slow checks (full-size parity, long benchmarks-as-tests).
test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow tests
