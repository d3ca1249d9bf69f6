# Quick start (see README.md): `make tiny` runs the tiny end-to-end pipeline, `make test` the
# test suite. Each installs what it needs first (system packages, .venv, this package).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup tiny test test-unit test-all bench clean
setup: $(STAMP)

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

tiny: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH examples/tiny/run.sh $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the unit tests alone (tests/test_<module>.py), without the end-to-end tests of tests/e2e
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests --ignore=tests/e2e

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --runslow tests

clean:
	rm -rf outputs multirun examples/tiny/work benchmarks/work
