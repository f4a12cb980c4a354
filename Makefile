# dsxfer: `make demo` runs the main job on the embedded default model, `make test` runs the tests.
# Both create or re-use .venv. Every package is installed at the version in constraints.txt (the
# file docker/Dockerfile uses too). torch is pinned and installed first: an unpinned torch pulls a
# multi-GB CUDA build, while torch==2.13.0 installs a CPU build in seconds.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
CONSTRAINTS := constraints.txt
# DeepSpeed compiles its CPU communication op on first use; a cache per venv is built once for this
# torch and never rebuilt because another environment on the machine used the shared default folder
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing torch (CPU build) and dsxfer into $(VENV) ..."
	@$(PIP) install -c $(CONSTRAINTS) $(TORCH) 2>&1 | { grep -v "is ignored" || true; }
	@$(PIP) install -c $(CONSTRAINTS) -e '.[dev]' 2>&1 | { grep -v "is ignored" || true; }
	@$(PY) -m pip --disable-pip-version-check check
	@cd /tmp && $(CURDIR)/$(PY) -c "import dsxfer.cli, pytest, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dsxfer demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

test-all: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not gpu and not slurm" tests

clean:
	rm -rf $(VENV) build *.egg-info
