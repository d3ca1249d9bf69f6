# Quick start (see README.md): `make tiny` runs the tiny end-to-end pipeline, `make test` the
# test suite. Each installs what it needs first (system packages, .venv, this package).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Python 3.12, for a second venv (CI runs the fast tests there too): python3.12 on PATH if it
# runs, else pyenv's.
PYTHON312 ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || \
  ls -d $$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)/versions/3.12*/bin/python3.12 2>/dev/null | tail -n 1)
VENV312 ?= .venv312
STAMP312 := $(VENV312)/.installed

.PHONY: setup setup-py312 tiny test test-unit test-py312 test-tiny test-all bench clean
setup: $(STAMP)
setup-py312: $(STAMP312)

$(STAMP): setup.py
	@command -v espeak-ng >/dev/null && command -v sox >/dev/null || { \
	  echo "installing espeak-ng and sox (apt-get)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng sox >/dev/null; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and bounded: an unbounded torch pulls a CUDA build and GBs of nvidia wheels
	$(BIN)/pip install -q 'torch==2.13.0'
	$(BIN)/pip install -q -e '.[test,plot]'
	touch $(STAMP)

# The same install on Python 3.12. No CPU-only torch wheel for 3.12 is on this machine's disk or on
# PyPI: torch==2.13.0 there is a CUDA build with several GB of nvidia wheels (it runs on the CPU).
$(STAMP312): setup.py $(STAMP)
	@test -n "$(PYTHON312)" || { echo "Python 3.12 not found: install it (pyenv install 3.12) or set PYTHON312=/path/to/python3.12" >&2; exit 1; }
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/pip install -q --upgrade pip
	$(VENV312)/bin/pip install -q 'torch==2.13.0'
	$(VENV312)/bin/pip install -q -e '.[test,plot]'
	touch $(STAMP312)

tiny: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH examples/tiny/run.sh $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the unit tests alone (tests/test_<module>.py), without the end-to-end tests of tests/e2e
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/e2e

test-py312: $(STAMP312)
	$(VENV312)/bin/python -m pytest -q tests

# the tiny example's reduced end-to-end run (TINY_PRESET=ci, about 6 minutes; marked slow, CI runs it)
test-tiny: $(STAMP)
	$(BIN)/python -m pytest -q --runslow tests/e2e/test_tiny_example.py::test_reduced_tiny_run

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --runslow tests

clean:
	rm -rf outputs multirun examples/tiny/work benchmarks/work
