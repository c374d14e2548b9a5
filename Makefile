# Quick start: `make sudoku` (train + evaluate a small Sudoku model on the CPU) and `make test`.
# Both create .venv and install the package on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch==2.13.0 is pinned in the same pip command: an unpinned torch pulls several GB of CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: sudoku test test-slow test-reference test-trm-reference install clean

# The C engine of sage's mailboxes is built in place by the editable install: rebuild it when its sources change.
$(STAMP): pyproject.toml sage/_pbm.c sage/_pbm_crc32.c sage/_pbm_crc32.h
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[torch,export,test]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

sudoku: $(STAMP)
	$(PY) -m experiments.sudoku

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# hrm_jax against the reference's own code: HRM_REFERENCE_DIR=/path/to/a/checkout/of/sapientinc/HRM
test-reference: $(STAMP)
	@test -f "$(HRM_REFERENCE_DIR)/models/hrm/hrm_act_v1.py" || { echo "Set HRM_REFERENCE_DIR to a checkout of \
	https://github.com/sapientinc/HRM (git clone https://github.com/sapientinc/HRM /tmp/HRM)"; exit 2; }
	$(PY) -m pip install -q pydantic
	HRM_REFERENCE_DIR="$(HRM_REFERENCE_DIR)" $(PY) -m pytest -q tests/test_reference_checkout.py

# hrm_jax's TRM against the reference's own code: TRM_REFERENCE_DIR=/path/to/TinyRecursiveModels (no pydantic needed)
test-trm-reference: $(STAMP)
	@test -f "$(TRM_REFERENCE_DIR)/models/recursive_reasoning/trm.py" || { echo "Set TRM_REFERENCE_DIR to a checkout \
	of https://github.com/SamsungSAILMontreal/TinyRecursiveModels"; exit 2; }
	TRM_REFERENCE_DIR="$(TRM_REFERENCE_DIR)" $(PY) -m pytest -q -s tests/test_trm_reference_checkout.py

clean:
	rm -rf $(VENV) runs
