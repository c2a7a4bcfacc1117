# Two commands a new user needs: `make demo` (the whole pipeline on the embedded phantom) and `make test`.
# Both create .venv with Python 3.11+ and install requirements.txt on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.requirements-installed

.PHONY: demo test test-slow bench evidence clean-demo help

help:
	@echo "make demo       run every phase on a generated phantom at 64 px (CPU, ~15 min)"
	@echo "make test       the fast CPU test suite"
	@echo "make test-slow  also the slow end-to-end tests"
	@echo "make bench      performance benchmarks against peers (bench/)"

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m ""
