# Two commands: `make train` (set up, then a short MINC run on procgen coinrun) and `make test`.
# Both use one environment, .venv/, set up once by `make setup` (a stamp skips the installs on a second call).
# Without make: python3.11 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '.[dev]'
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed first and pinned: 2.13.0 is a CPU wheel of ~190 MB on these machines (torch 2.14.1 here is a
# CUDA build that pulls several GB of CUDA libraries). No torchvision matches the CPU wheel (PyPI's torchvision
# 0.28.0 is built against CUDA torch and fails to import beside it), so the `vision` extra (ResNet backbones) is
# not part of this environment and the ResNet tests skip; install it where a matching torch/torchvision pair is.
TORCH := torch==2.13.0
STAMP := $(VENV)/.setup-torch-2.13.0

.PHONY: setup train test test-slow clean

$(STAMP): pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "minc_rl needs Python >= 3.11; set PYTHON=python3.11")'
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH)
	$(PY) -c "import torchvision" 2>/dev/null || $(PIP) uninstall -y -q torchvision  # one left that does not import
	$(PIP) install -e '.[dev,cluster,joblib]'
	$(PY) -c "import torch, minc_rl.train; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

setup: $(STAMP)

train: setup
	$(PY) -m minc_rl.train env=procgen:coinrun aux=minc total_steps=8192 n_envs=8 eval.episodes=8 torch_threads=1

test: setup
	$(PY) -m pytest -m "not slow"

test-slow: setup
	$(PY) -m pytest -m slow

clean:
	rm -rf $(VENV) build dist *.egg-info
