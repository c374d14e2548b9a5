# Quick start: `make sudoku` (train + evaluate a small Sudoku model on the CPU) and `make test`.
# Both create .venv and install the package on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch==2.13.0 is pinned in the same pip command: an unpinned torch pulls several GB of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: sudoku test test-slow install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[torch,export,test]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

sudoku: $(STAMP)
	$(PY) -m experiments.sudoku

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs
