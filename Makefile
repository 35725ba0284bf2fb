# One-command set-up and runs on a fresh machine (torch 2.13.0 unless a torch is already there: from the
# configured index, which on Linux from the public one is the CUDA build; TORCH_INDEX=<CPU wheel index> for CPU).
#   make test    venv + torch + build/install the package with its C++ extension + the test suite
#   make demo    venv + torch + the package with the `trainer` extra + `opd-distill` (the default experiment)
#   make bench   venv + ... + `opd-bench --quick`
#   make gpu-check  (on a CUDA machine, with a CUDA torch and nvcc) build with the CUDA epilogues, run the
#                gpu-marked tests and the GPU bench cases, write gpu-check.md (benchmarks/gpu_check.py; build +
#                150 s of tests + 180 s of bench, meant to fit 8 min on one H100/H200; never run yet)
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

gpu-check: venv
	@$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.version.cuda else 'gpu-check: needs a CUDA build of torch and a visible GPU')"
	@# the build sees a CUDA torch and nvcc, so setup.py adds csrc/cuda/*.cu (sm_80, sm_90)
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[test,triton]"
	-$(BIN)/python -m pip install --quiet --no-deps cut-cross-entropy liger-kernel
	$(BIN)/python benchmarks/gpu_check.py --out gpu-check.md --tests-timeout 150 --bench-timeout 180

clean:
	rm -rf build dist *.egg-info opd_kernels/_C*.so
