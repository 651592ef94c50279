# pyoptim developer entry points. Every target is idempotent and sets itself up on a fresh machine.
#   make demo        venv + pinned deps + build, then the main job (the group-lasso benchmark)
#   make test        venv + pinned deps + build, then the whole test suite
#   make cuda-check  compile every csrc/cuda/*.cu with nvcc (compile only; no GPU needed)
#   make bench       every benchmark script, results in bench/results/

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

SOURCES := $(shell find csrc triton_kernels pyoptim -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null) CMakeLists.txt pyproject.toml

.PHONY: demo test cuda-check bench install clean

demo: $(VENV)/.built
	PYOPTIM_QUIET=1 $(PY) bench/bench_group_lasso.py

test: $(VENV)/.built
	TRITON_INTERPRET=1 PYOPTIM_QUIET=1 $(VENV)/bin/pytest -q

cuda-check: $(VENV)/.deps
	PY=$(PY) bash tools/check_cuda_compile.sh

bench: $(VENV)/.built
	PYOPTIM_QUIET=1 $(PY) bench/bench_group_lasso.py

install: $(VENV)/.built

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(VENV)/bin/python requirements/dev.txt Makefile
	$(PIP) install -q "$(TORCH)" -r requirements/dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps .
	touch $@

clean:
	rm -rf build $(VENV)
