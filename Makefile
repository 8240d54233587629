# The two commands of a fresh machine: `make demo` (the main job on a built-in tiny
# model) and `make test` (the test suite). Both set up a virtual environment in .venv
# that sees the system's packages, install what is missing, and build pio_kernels._C.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.pio-built
CSRC := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*.h)
PYTEST_ARGS ?=

.PHONY: install test test-transformers freeze demo bench check-cuda gpu-check clean

$(VPY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(DEPS): $(VPY) requirements-dev.txt requirements-nodeps.txt constraints-dev.txt
	$(VPY) -m pip install -q --disable-pip-version-check -U "setuptools>=64" wheel
	$(VPY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt -c constraints-dev.txt
	$(VPY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt -c constraints-dev.txt
	touch $@

$(BUILT): $(DEPS) setup.py pyproject.toml $(CSRC)
	$(VPY) -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $@

install: $(BUILT)

# NO_VENV=1 runs test, demo and bench with the machine's own python3 and skips the install
# step, for a machine whose Python already has torch and the project installed (the offline
# GPU machine: `pip install --no-deps --no-build-isolation -e .`, then `make test NO_VENV=1`).
RUN_PY := $(if $(NO_VENV),$(PYTHON),$(VPY))
RUN_DEPS := $(if $(NO_VENV),,install)
CHECK_DEPS := $(if $(NO_VENV),,$(DEPS))

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: $(RUN_DEPS) check-cuda
	$(RUN_PY) -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# The integration tests on another transformers release (CI runs 5.17.0 and newest), e.g.
# `make test-transformers TRANSFORMERS=5.17.0`; see .ci/test-transformers.
TRANSFORMERS ?= newest
test-transformers: install
	.ci/test-transformers $(TRANSFORMERS)

# Rewrites constraints-dev.txt from .venv (after changing requirements-dev.txt and testing).
freeze: install
	{ sed -n '1,3p' constraints-dev.txt; $(VPY) -m pip freeze --local | grep -v -e '^-e' -e '^pio' -e '^torch=='; \
	  echo "torch==2.13.0"; } > constraints-dev.tmp && mv constraints-dev.tmp constraints-dev.txt

demo: $(RUN_DEPS)
	$(RUN_PY) examples/demo.py

# Benchmarks for whatever device is present (small labelled shapes on CPU), then the plot and
# the README results section; e.g. `make bench E2E_ARGS="--models llava-1.5-7b"` for a part.
KERNELS_ARGS ?=
E2E_ARGS ?=
bench: $(RUN_DEPS)
	$(RUN_PY) benchmarks/kernels.py $(KERNELS_ARGS)
	$(RUN_PY) benchmarks/e2e.py $(E2E_ARGS)
	$(RUN_PY) benchmarks/plot.py --markdown-out benchmarks/results/README-section.md --update-readme README.md

# Syntax check of the CUDA sources where nvcc exists, so a broken kernel cannot land
# unnoticed on a CPU-only CI machine. A CPU-only torch ships the c10/cuda headers
# without the generated cuda_cmake_macros.h: a one-line stand-in is put on the path.
check-cuda: $(CHECK_DEPS)
	@if command -v nvcc >/dev/null 2>&1 && [ -n "$(wildcard csrc/cuda/*.cu)" ]; then \
	  inc=$$($(RUN_PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))"); \
	  stub=$$(mktemp -d); mkdir -p $$stub/c10/cuda/impl; \
	  echo '#define C10_CUDA_BUILD_SHARED_LIBS' > $$stub/c10/cuda/impl/cuda_cmake_macros.h; \
	  for f in $(wildcard csrc/cuda/*.cu); do \
	    echo "nvcc -c $$f"; \
	    nvcc -std=c++20 --expt-relaxed-constexpr -arch=sm_90 $$inc -I$$stub -I$$($(RUN_PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])") -c $$f -o /dev/null || { rm -rf $$stub; exit 1; }; \
	  done; rm -rf $$stub; \
	else echo "check-cuda: no nvcc or no .cu sources, skipped"; fi

# Everything a GPU machine can check in one command, within about 8 minutes on an H100/H200:
# the build with PIO_REQUIRE_EXTENSION=1, compute-sanitizer memcheck and racecheck, every
# cuda-marked test, the kernel and end-to-end benchmarks at 7B shapes (benchmarks/gpu_check.py).
# Runs with the machine's own python3 (no venv, no network); results in benchmarks/results/,
# e.g. `make gpu-check GPU_CHECK_ARGS="--mirror $OUT"` (the shell expands $OUT); `--dry-run`
# checks the plumbing anywhere.
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build *.egg-info pio_kernels/_C*.so $(VENV) .venv-tf
