# One-command set-up and runs on a fresh machine (torch 2.13.0 unless a torch is already there: from the
# configured index, which on Linux from the public one is the CUDA build; TORCH_INDEX=<CPU wheel index> for CPU).
#   make test    venv + torch + build/install the package with its C++ extension + the test suite
#   make demo    venv + torch + the package with the `trainer` extra + `opd-distill` (the default experiment)
#   make bench   venv + ... + `opd-bench --quick`
#   make gpu-check  on a CUDA machine as it is: its python3 (GPU_PYTHON) with its CUDA torch, Triton, pytest
#                and nvcc; no venv, no download. pip install -e . with the CUDA epilogues for sm_90 only
#                (GPU_ARCHS), the optional wheels from gpu-wheels/ when there, then the gpu-marked tests and the
#                GPU bench cases into gpu-check.md (GPU_CHECK_OUT); each step time-limited, 450 s in all
#                (benchmarks/gpu_check.py; only its CPU dry run has run so far, not the GPU steps)
#   make gpu-wheels  (where there is network) pip download the pinned cut-cross-entropy and liger-kernel
#                wheels, with setuptools and ninja for the build, into gpu-wheels/ to carry to the GPU machine
# Switches: OPD_SKIP_EXT=1 (no compiled extension), VENV=path, PYTHON=python3.x, TORCH_SPEC=torch==2.13.0,
#           TORCH_INDEX=url (pip --index-url for torch only)

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# The pinned test environment (exact versions the suite was verified with); empty: the newest releases.
CONSTRAINTS ?= requirements/test-constraints.txt
PIN_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
BIN := $(VENV)/bin
# The test suite insists on the compiled extension unless the build was skipped on purpose.
OPD_REQUIRE_EXT ?= $(if $(filter 1,$(OPD_SKIP_EXT)),0,1)
export OPD_REQUIRE_EXT

.PHONY: venv install install-demo test test-latest pin demo bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip $(PIN_C)

venv: $(BIN)/python
	@# torch first, so nothing below pulls another one (TORCH_INDEX: e.g. PyTorch's CPU wheel index).
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet setuptools wheel ninja numpy $(PIN_C)

install: venv
	@# --no-build-isolation: build against the torch installed above (an isolated build would download one).
	$(BIN)/python -m pip install --quiet --no-build-isolation $(PIN_C) -e ".[test,triton]"
	$(BIN)/python -m opd_kernels

test: install
	OPD_PINNED_ENV=$(if $(CONSTRAINTS),1,0) $(BIN)/python -m pytest -ra -q --durations=15 tests

# The suite against the newest releases (not the pins), in its own venv; then the CausalLM families added
# since the pinned transformers, each classified (read correctly / refused by name / unbuildable, with why).
test-latest:
	rm -rf .venv-latest
	$(MAKE) install VENV=.venv-latest CONSTRAINTS=
	-.venv-latest/bin/python -m pytest -ra -q tests
	.venv-latest/bin/python tests/causal_lm_sweep.py --new-since requirements/causal-lm-families.txt

# Refresh the pins: the newest releases in a fresh venv, the whole suite, and only if it passes, the pinned
# versions (requirements/test-constraints.txt) and the CausalLM family list rewritten from that venv.
pin:
	rm -rf .venv-pin
	$(MAKE) install VENV=.venv-pin CONSTRAINTS=
	.venv-pin/bin/python -m pytest -ra -q tests
	.venv-pin/bin/python requirements/pin.py

# The study needs only the trainer extra: no test tools, no Triton (about 1 GB, of no use on a CPU).
install-demo: venv
	$(BIN)/python -m pip install --quiet --no-build-isolation $(PIN_C) -e ".[trainer]"
	$(BIN)/python -m opd_kernels

demo: install-demo
	$(BIN)/opd-distill

bench: install
	$(BIN)/opd-bench --quick

GPU_PYTHON ?= python3
GPU_CHECK_OUT ?= gpu-check.md
GPU_WHEELS ?= gpu-wheels
GPU_ARCHS ?= 9.0
GPU_WHEEL_PLATFORM ?= --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
.PHONY: gpu-wheels

# No dependency on venv: the GPU machine cannot download. The script builds, installs and reports itself.
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) --wheels $(GPU_WHEELS) --archs $(GPU_ARCHS)

# For the GPU machine's interpreter (GPU_WHEEL_PLATFORM), whatever runs this download.
gpu-wheels:
	specs="$$($(PYTHON) benchmarks/gpu_check.py --wheel-specs)" && \
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: $(GPU_WHEEL_PLATFORM) --dest $(GPU_WHEELS) \
		$$specs "setuptools>=77" ninja
	@ls -l $(GPU_WHEELS)

clean:
	rm -rf build dist *.egg-info opd_kernels/_C*.so
