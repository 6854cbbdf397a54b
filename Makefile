# Two commands a new user needs: `make quickstart` and `make test`. Both create .venv with
# python3 and install the package with its pinned dependencies first (pyproject.toml, through
# requirements*.txt: `pip install -e ".[cpu]"` / `".[cpu,dev]"`; only when they changed).
# Accelerator hosts install `pip install -e ".[tpu]"` or `".[cuda12]"` instead (docs/pods.md).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdirs/quickstart

.PHONY: quickstart test install install-dev clean

# The installer: uv (pinned, from PyPI into the venv) installs the same pinned versions as pip in
# a fraction of the time.
# `make INSTALLER=pip ...` uses pip alone, e.g. where only a pip.conf mirror reaches the packages
# (uv does not read pip.conf).
# Bytecode: neither installer compiles the 2.8 GB of packages up front (uv --compile-bytecode
# took 31 s); instead these commands let Python write the bytecode of what is imported, once, at
# the first import. Where the environment sets PYTHONDONTWRITEBYTECODE, every process would
# otherwise compile JAX, Flax, Orbax etc. again at every start, and the tests start ~20
# processes.
export PYTHONDONTWRITEBYTECODE :=
INSTALLER ?= uv
UV_VERSION := 0.13.9
ifeq ($(INSTALLER),uv)
PIP_INSTALL = $(BIN)/python -m uv pip install -q --python $(BIN)/python
else
PIP_INSTALL = $(BIN)/python -m pip install -q --no-compile
endif

$(VENV)/.installed-runtime: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(INSTALLER),uv)
	$(BIN)/python -m pip install -q uv==$(UV_VERSION)
else
	$(BIN)/python -m pip install -q --upgrade pip
endif
	$(PIP_INSTALL) -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-runtime requirements-dev.txt pyproject.toml
	$(PIP_INSTALL) -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed-runtime
install-dev: $(VENV)/.installed-dev

# Runs the REMEDIS pipeline at CPU scale on PneumoniaMNIST, found in or downloaded once to
# ~/.medmnist (`make quickstart MEDMNIST_DIR=/data/medmnist` names another folder); on the
# built-in synthetic chest X-rays when it cannot be downloaded.
quickstart: $(VENV)/.installed-runtime
	$(BIN)/python -m experiments.quickstart --workdir=$(WORKDIR) \
	  $(if $(MEDMNIST_DIR),--medmnist_dir=$(MEDMNIST_DIR))

# The whole suite; CPU only, tiny models, data generated in the tests. Two pytest-xdist workers
# (compiling the tiny trainer programs is single-threaded), an idle worker takes queued tests from
# the other (`--dist worksteal`: a few tests take minutes); TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

clean:
	rm -rf $(VENV) workdirs .pytest_cache
