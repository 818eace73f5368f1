# tokenloom — `make demo` runs a small end-to-end experiment, `make test` the
# test suite. Both create .venv and install the project on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tokenloom-installed
EXAMPLE_PLUGIN := examples/tokenloom-example-plugin

.PHONY: venv demo test test-all bench lint clean

$(STAMP): pyproject.toml $(EXAMPLE_PLUGIN)/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e $(EXAMPLE_PLUGIN)
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m tokenloom demo

test: venv
	$(PY) -m pytest -q -m "not slow"

test-all: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/decode.py

lint: venv
	$(PY) -m ruff check core plugins tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
