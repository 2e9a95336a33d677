# Everything a fresh machine needs lives here: `make train` and `make test` set up and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that our development machines carry locally; on other machines
# install the torch you want first (the package itself accepts a range).
TORCH_PIN ?= torch==2.13.0
# The torchao release checked against that torch (FP8 training, an optional extra).
TORCHAO_PIN ?= torchao==0.18.0

.PHONY: setup train test test-fast bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_PIN)" "$(TORCHAO_PIN)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/loom train

test: setup
	$(PY) -m pytest -q tests

# A subset for between commits (about a minute): tests marked `fast`.
test-fast: setup
	$(PY) -m pytest -q -m fast tests

bench: setup
	$(PY) benchmarks/vs_transformers.py

clean:
	rm -rf $(VENV) runs
