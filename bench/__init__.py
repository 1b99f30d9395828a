"""genvisor's benchmarks: each scenario measured side by side with its peers in one run.

`python -m bench` (or `make bench`) runs them and writes results.json, results.md and
plots under bench/results/<UTC time>/; `python -m bench.check` (`make bench-check`)
holds a run against bench/thresholds.toml. Never part of the test suite.
"""
