# One-command entry points for a fresh machine (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,data,parity,plots]"
	# pytorch-fid and lpips (parity tests) without their torchvision dependency: the PyPI torchvision
	# wheel for torch 2.13 needs CUDA libraries; the tests stand in for the torchvision layers used
	$(PY) -m pip install -q --no-deps "pytorch-fid==0.3.0" "lpips==0.1.4"
	touch $(STAMP)

.PHONY: setup test test-slow demo bench
setup: $(STAMP)

## Set up the virtual environment and pass the test suite (what CI runs).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

## Set up and run the main job on the embedded default data: train the class-conditional digits
## model (configs/digits.py; resumes if runs/digits has checkpoints), then draw and score 100 samples.
demo: $(STAMP)
	$(PY) train.py --config configs/digits.py --workdir runs/digits
	$(PY) sample.py --workdir runs/digits --num 100 --steps 10 --eval digits --out runs/digits/demo

## Slow checks (full-size parity, long benchmarks-as-tests).
test-slow: $(STAMP)
	$(PY) -m pytest -q -n 2 -m slow tests
