# The two commands a newcomer needs: `make demo` and `make test`. Both create the
# virtual environment on first use and reuse it afterwards (the stamp file below is
# refreshed only when pyproject.toml or the constraints change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU wheel of torch for CI and the demo; GPU clusters install without this file.
CONSTRAINTS ?= constraints/cpu.txt
DEMO_CONFIG ?= jobs/configs/namd_debug.yaml
PYTEST_ARGS ?=

.PHONY: install demo lint test bench clean-demo help

help:
	@echo "make demo   - install, then run the main job on the embedded default (local Ray, synthetic cohort, local MLflow)"
	@echo "make lint   - install, then ruff check + ruff format --check (settings in pyproject.toml)"
	@echo "make test   - install, lint, then run the test suite"
	@echo "make bench  - install, then run the benchmarks in benchmarks/"

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The whole NAMD job (synthetic cohort -> ingest -> VAE -> latent cache -> both LDM
# stages), then its evaluation (ablation, ViT evaluator, cohort forecasts, Table 1),
# each submitted to a local Ray head with `ray job submit`, as on a cluster.
demo: install
	cluster/local_job.sh jobs/train_namd.py --config $(DEMO_CONFIG) --then jobs/evaluate_namd.py --config $(DEMO_CONFIG)

# Lint first: a finding fails in seconds instead of after the ~20 min suite.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/ingest_throughput.py
	$(PY) benchmarks/ddim_batching.py
	$(PY) benchmarks/training_throughput.py --steps 120
	$(PY) benchmarks/training_overhead.py --steps 120
	$(PY) benchmarks/streaming_object_store.py
	$(PY) benchmarks/cohort_forecast_throughput.py
	$(PY) benchmarks/serve_load.py

clean-demo:
	rm -rf runs/demo mlruns
