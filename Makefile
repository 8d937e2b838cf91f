# make venv   .venv with the CPU environment (idempotent: re-runs only when its inputs change)
# make test   the test suite on CPU (Triton kernels through TRITON_INTERPRET=1)
# make demo   the tree-of-thought demo against a server with the deft decode backend
#             (on a GPU host with SGLang already installed: `make demo PYTHON=python3`;
#             DEMO_ARGS="--widths 4,4 --max-tokens 64" passes the demo's options)

PYTHON_BOOTSTRAP ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
PYTHON ?= $(VENV_PYTHON)
# A PYTHON exported by the shell (node-gyp setups export one) is not a request for another SGLang: only
# `make demo PYTHON=...` on the command line is.
ifeq ($(origin PYTHON),environment)
ifneq ($(filter demo,$(MAKECMDGOALS)),)
ifneq ($(abspath $(PYTHON)),$(abspath $(VENV_PYTHON)))
$(info PYTHON=$(PYTHON) from the environment is not used: $(VENV_PYTHON) is (another SGLang: make demo PYTHON=$(PYTHON)))
endif
endif
override PYTHON := $(VENV_PYTHON)
endif
PYTEST_ARGS ?=

# SGLang imports sgl_kernel even on CPU; its Python files come from this wheel, its native
# libraries stay out (sglang_deft/cpu_compat stands in for them).
# The wheel for this machine (x86_64 or aarch64: PyPI has both; only its Python files are used).
SGL_KERNEL_WHEEL := .whl/sglang_kernel-0.4.1-cp310-abi3-manylinux2014_$(shell uname -m).whl
VENV_STAMP := $(VENV)/.sglang-deft-venv

.PHONY: venv test demo

venv: $(VENV_STAMP)

# A venv whose pip runs: one that `python -m venv` left half-made (no ensurepip, e.g. Debian without python3-venv)
# is made again (--clear) instead of failing at its missing pip on every later run.
VENV_WORKS = $(VENV_PYTHON) -m pip --version >/dev/null 2>&1
# PyPI's torch 2.13.0 is a CUDA build, whose CUDA libraries --no-deps leaves out: torch's import would then fail
# far from the cause (libcublasLt not found). Read from its metadata, without importing it.
TORCH_IS_CPU_BUILD = -c 'import importlib.metadata as m, sys; sys.exit( \
	  "torch in $(VENV) is a CUDA build (PyPI'"'"'s wheel), whose CUDA libraries this CPU environment does not install: " \
	  "rm -rf $(VENV), then rerun with PIP_EXTRA_INDEX_URL=$(TORCH_CPU_INDEX) (README)" \
	  if any(r.startswith("nvidia-") for r in m.requires("torch") or []) else None)'

# Where a machine without a local CPU wheel gets one (only then: the CPU index is not reached otherwise).
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_PIN := $(shell grep -m1 '^torch==' requirements-cpu.txt)

$(VENV_STAMP): requirements-cpu.txt pyproject.toml sglang_deft/cpu_compat/extract_sgl_kernel.py
	@$(VENV_WORKS) || $(PYTHON_BOOTSTRAP) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else \
	  f"the CPU environment needs Python 3.11+ (its pins, numpy 2.4 among them); {sys.executable} is " \
	  f"{sys.version.split()[0]}: run make with PYTHON_BOOTSTRAP=python3.11 (or newer)")'
	$(VENV_WORKS) || $(PYTHON_BOOTSTRAP) -m venv --clear $(VENV)
	@echo "installing the CPU environment into $(VENV) (a few minutes the first time)"
	$(VENV_PYTHON) -m pip install --quiet --no-deps -r requirements-cpu.txt
	@$(VENV_PYTHON) $(TORCH_IS_CPU_BUILD) 2>/dev/null || { \
	  echo "$(TORCH_PIN) came as PyPI's CUDA build: installing PyTorch's CPU build from $(TORCH_CPU_INDEX)"; \
	  $(VENV_PYTHON) -m pip install --quiet --no-deps --force-reinstall --index-url $(TORCH_CPU_INDEX) $(TORCH_PIN); }
	@$(VENV_PYTHON) $(TORCH_IS_CPU_BUILD)
	$(VENV_PYTHON) -m pip install --quiet --no-deps -e .
	@test -f $(SGL_KERNEL_WHEEL) || echo "downloading sglang-kernel 0.4.1 (~350 MB; its Python files only are used on CPU)"
	test -f $(SGL_KERNEL_WHEEL) || $(VENV_PYTHON) -m pip download --quiet --no-deps --dest .whl sglang-kernel==0.4.1
	$(VENV_PYTHON) -m sglang_deft.cpu_compat.extract_sgl_kernel $(SGL_KERNEL_WHEEL)
	touch $@

# Two pytest-xdist workers: the suite is mostly SGLang servers starting and decoding, whose processes
# leave one of CI's 2 cores idle much of the time under one worker. Each module's servers start on
# one worker (tests/conftest.py); `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

# The planner's C library, built (or found in its cache) before anything starts: without a C compiler this
# says so once, instead of in every server's log.
C_LIBRARY_CHECK = -c 'from sglang_deft.kernels import c_library; c_library.load("schedule.c")'

test: venv
	@$(VENV_PYTHON) $(C_LIBRARY_CHECK)
	TRITON_INTERPRET=1 $(VENV_PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The venv is the CPU environment: a caller passing its own PYTHON brings its own SGLang, and must have
# installed this package into it (kernels/ and patches/ become sglang_deft.* only through the install).
demo: $(if $(filter $(VENV_PYTHON),$(PYTHON)),venv)
	@$(PYTHON) -c 'import sglang_deft.kernels, sglang_deft.patches' || { \
	  echo "$(PYTHON) cannot import sglang_deft.kernels and sglang_deft.patches (above). If sglang-deft is not" \
	    "installed for it, run '$(PYTHON) -m pip install --no-deps -e .' here first (with --no-build-isolation" \
	    "where no package index is reachable)" >&2; \
	  exit 2; }
	@$(PYTHON) $(C_LIBRARY_CHECK)
	$(PYTHON) -m sglang_deft.demo $(DEMO_ARGS)
