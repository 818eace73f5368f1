# tokenloom — `make demo` runs a small end-to-end experiment, `make test` the
# test suite. Both create .venv and install the project on first use.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tokenloom-installed
EXAMPLE_PLUGIN := examples/tokenloom-example-plugin

.PHONY: venv demo test test-all bench bench-long claims continuous lint clean

$(STAMP): pyproject.toml $(EXAMPLE_PLUGIN)/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]' -e $(EXAMPLE_PLUGIN)
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m tokenloom demo

# The tests wait passively for OpenMP threads unless told otherwise: they run on machines shared with
# other jobs and start torchrun ranks, where spinning threads starve the ones doing the work.
TEST_ENV = OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE}

test: venv
	$(TEST_ENV) $(PY) -m pytest -q -m "not slow"

test-all: venv
	$(TEST_ENV) $(PY) -m pytest -q

# make bench: every figure against its peer in a few minutes each (the demo's wall time included),
# then the generated sections of docs/benchmarks.md; make bench-long: more repeats, the ablation's
# wall time, and the quality benchmarks of the tokenizers and the speculative family (an hour or more).
bench: venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/decode.py
	$(PY) bench/train.py
	$(PY) bench/quantizers.py
	$(PY) bench/orders.py
	$(PY) bench/pipeline.py
	$(PY) bench/report.py

bench-long: venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/decode.py --repeats 7
	$(PY) bench/train.py --repeats 5 --steps-scale 2
	$(PY) bench/quantizers.py --repeats 9
	$(PY) bench/orders.py --repeats 5
	$(PY) bench/pipeline.py --ablation
	$(PY) bench/report.py
	$(PY) bench/tokenizers_compare.py
	$(PY) bench/speculative.py

# make claims: the seeds' headline claims checked by a compute-matched study run through
# `tokenloom ablate` (bench/claims.py; nothing installed beyond the venv) -> docs/claims.md with
# verdicts computed by the script, docs/claims/quality-vs-train-flops.png, and docs/orders.md's
# measured tables from the same run. Re-runs reuse every finished stage under runs/claims-<budget>/.
# CLAIMS_BUDGET=smoke checks the pipeline in minutes; small is full's plan at a quarter of its
# training; `bench/claims.py --budget full --estimate` prints how long full takes (idle and now).
CLAIMS_BUDGET ?= full
claims: venv
	$(PY) bench/claims.py --budget $(CLAIMS_BUDGET)

# make continuous: discrete against continuous tokens (MAR vs MaskGIT, raster + diffusion head vs
# raster on VQ, FlowAR vs VAR) at equal backbone training FLOPs on 16-px shapes, the heads' sampling
# steps swept on one trained model each (bench/continuous.py) -> docs/continuous.md and
# docs/continuous/quality-vs-head-steps.png. About 30 min on the shared 2-core CPU, one thread;
# re-runs reuse every finished stage under runs/continuous-full/. CONTINUOUS_BUDGET=smoke: minutes.
CONTINUOUS_BUDGET ?= full
continuous: venv
	OMP_NUM_THREADS=1 $(PY) bench/continuous.py --budget $(CONTINUOUS_BUDGET)

# the same check as tests/test_lint.py: the whole repository (bench/ and examples/ included)
lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
