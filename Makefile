# One-command set-up and runs on a fresh machine (CPU torch 2.13.0 build unless a torch is already there).
#   make test    venv + torch + build/install the package with its C++ extension + the test suite
#   make demo    venv + ... + the main job: `opd-distill` (the embedded default distillation experiment)
#   make bench   venv + ... + `opd-bench --quick`
# Switches: OPD_SKIP_EXT=1 (no compiled extension), VENV=path, PYTHON=python3.x, TORCH_SPEC=torch==2.13.0

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# The test suite insists on the compiled extension unless the build was skipped on purpose.
OPD_REQUIRE_EXT ?= $(if $(filter 1,$(OPD_SKIP_EXT)),0,1)
export OPD_REQUIRE_EXT

.PHONY: venv install test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

venv: $(BIN)/python
	@# torch first, from the CPU wheel, so nothing below pulls a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet setuptools wheel ninja numpy

install: venv
	@# --no-build-isolation: build against the torch installed above (an isolated build would download one).
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test,triton]"
	$(BIN)/python -m opd_kernels

test: install
	$(BIN)/python -m pytest -ra -q --durations=15 tests

demo: install
	$(BIN)/opd-distill

bench: install
	$(BIN)/opd-bench --quick

clean:
	rm -rf build dist *.egg-info opd_kernels/_C*.so
