# One-command entry points for a fresh machine (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
FULL := $(VENV)/.installed-full

# the demo needs the package and its data stack only (no torch, no diffusers)
$(BASE): setup.cfg setup.py pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[data]"
	touch $(BASE)

# the tests add the test tools and the parity extras (torch CPU, diffusers, ...)
$(FULL): $(BASE)
	$(PY) -m pip install -q -e ".[test,data,parity,plots]"
	# pytorch-fid and lpips (parity tests) without their torchvision dependency: the PyPI torchvision
	# wheel for torch 2.13 needs CUDA libraries; the tests stand in for the torchvision layers used
	$(PY) -m pip install -q --no-deps "pytorch-fid==0.3.0" "lpips==0.1.4"
	touch $(FULL)

.PHONY: setup setup-demo test test-slow demo bench
setup-demo: $(BASE)
setup: $(FULL)

## Set up the virtual environment and pass the test suite (what CI runs).
test: $(FULL)
	$(PY) -m pytest -q -n 2 tests

## Set up and run the main job on the embedded default data: train the class-conditional digits
## model (configs/digits.py; resumes if runs/digits has checkpoints), then draw and score 100 samples.
demo: $(BASE)
	$(VENV)/bin/jaxdiff-train --config digits --workdir runs/digits
	$(VENV)/bin/jaxdiff-sample --workdir runs/digits --num 100 --steps 10 --eval digits --out runs/digits/demo

## Slow checks (full-size parity, long benchmarks-as-tests).
test-slow: $(FULL)
	$(PY) -m pytest -q -n 2 -m slow tests
