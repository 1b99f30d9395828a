PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run lint test bench bench-check clean

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

# ruff over the tree, mypy over the package (strict on modes/ and ipc/; see pyproject.toml).
lint: $(TEST_STAMP)
	$(PY) -m ruff check .
	$(PY) tools/typecheck.py

test: $(TEST_STAMP) lint
	$(PY) -m pytest

$(BENCH_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[bench]'
	touch $@ $(STAMP)

# The benchmarks, never part of `make test` (≈5 min; BENCH_ARGS=--quick for ≈1.5 min):
# results.json, results.md and plots in bench/results/<UTC time>/, and bench/results/latest.
bench: $(BENCH_STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# Hold the latest run against bench/thresholds.toml; non-zero on a regression.
bench-check: $(STAMP)
	$(PY) -m bench.check

clean:
	rm -rf $(VENV) build *.egg-info
