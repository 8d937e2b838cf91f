# make venv   .venv with the CPU environment (idempotent: re-runs only when its inputs change)
# make test   the test suite on CPU (Triton kernels through TRITON_INTERPRET=1)
# make demo   the tree-of-thought demo against a server with the deft decode backend
#             (on a GPU host with SGLang already installed: `make demo PYTHON=python3`;
#             DEMO_ARGS="--widths 4,4 --max-tokens 64" passes the demo's options)

PYTHON_BOOTSTRAP ?= python3
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
PYTHON ?= $(VENV_PYTHON)
PYTEST_ARGS ?=

# SGLang imports sgl_kernel even on CPU; its Python files come from this wheel, its native
# libraries stay out (sglang_deft/cpu_compat stands in for them).
# The wheel for this machine (x86_64 or aarch64: PyPI has both; only its Python files are used).
SGL_KERNEL_WHEEL := .whl/sglang_kernel-0.4.1-cp310-abi3-manylinux2014_$(shell uname -m).whl
VENV_STAMP := $(VENV)/.sglang-deft-venv

.PHONY: venv test demo

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements-cpu.txt pyproject.toml sglang_deft/cpu_compat/extract_sgl_kernel.py
	@test -x $(VENV_PYTHON) || $(PYTHON_BOOTSTRAP) -c 'import sys; sys.exit(None if sys.version_info >= (3, 11) else \
	  f"the CPU environment needs Python 3.11+ (its pins, numpy 2.4 among them); {sys.executable} is " \
	  f"{sys.version.split()[0]}: run make with PYTHON_BOOTSTRAP=python3.11 (or newer)")'
	test -x $(VENV_PYTHON) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	@echo "installing the CPU environment into $(VENV) (a few minutes the first time)"
	$(VENV_PYTHON) -m pip install --quiet --no-deps -r requirements-cpu.txt
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
