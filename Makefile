PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $@ $(STAMP)

# Start a daemon on the offline scripted backend, run a short demo, stop it.
run: $(STAMP)
	$(PY) -m genvisor demo

test: $(TEST_STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/latency.py

clean:
	rm -rf $(VENV) build *.egg-info
