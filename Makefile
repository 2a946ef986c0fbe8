# Two commands: `make train` (set up, then a short MINC run on procgen coinrun) and `make test`.
# The set-up lives in .venv/ and is idempotent: stamps skip the installs on a second call.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python

.PHONY: setup setup-vision train test test-slow benchmarks clean

# Base install. torch 2.13.0 is pinned first because the CPU wheel of that release lies on these
# machines' disk; an unpinned torch would pull a several-GB CUDA build.
$(VENV)/.base: pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev,cluster]'
	touch $@

# The `vision` extra (torchvision for ResNet backbones): PyPI's torchvision does not import beside
# the 2.13.0 CPU wheel, so this moves to the torch 2.14.1 / torchvision 0.29.1 pair from local disk.
$(VENV)/.vision: $(VENV)/.base
	$(PY) -c "import torchvision" 2>/dev/null || $(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -e '.[dev,vision,cluster]'
	touch $@

setup: $(VENV)/.base
setup-vision: $(VENV)/.vision

train: setup
	$(PY) -m minc_rl.train env=procgen:coinrun aux=minc total_steps=8192 n_envs=8 eval.episodes=8 torch_threads=1

test: setup-vision
	$(PY) -m pytest -m "not slow"

test-slow: setup-vision
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) build dist *.egg-info
