# One command each: `make demo` runs the main job, `make test` the whole suite,
# `make bench` the benchmark (about 57 minutes: 44 measured 2026-12-02, plus 13 for the
# lanes section measured 2026-12-05; writes
# bench/RESULTS.md).
# Both create .venv and install the project into it first when needed.
# `make test-fast` runs the pure-logic tier in seconds. `make test-floors` runs the core end-to-end tests again with every direct dependency
# at the lowest version pyproject.toml allows (CI runs both).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast test-floors lint typecheck check clean bench docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sfox-tokens demo

test: $(STAMP)
	.ci/ensure-redis
	$(BIN)/ruff check tasks tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(DOCS_BUILD)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The documentation site (mkdocs.yml, docs/), strict: a broken link or reference fails it.
# Written to site/ (git-ignored). Material's notice about its successor is left out.
DOCS_BUILD = NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

docs: $(STAMP)
	$(DOCS_BUILD)

# Pure logic only (tests/fast/: no Redis, no worker, no network): seconds.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/fast -q $(PYTEST_ARGS)

# Extra arguments for pytest in test, test-fast and test-floors: PYTEST_ARGS="-x -q"
PYTEST_ARGS ?=

# A second venv where uv's lowest-direct resolution puts every direct dependency (celery,
# kombu, redis, requests, tenacity, cryptography, prometheus_client; flower for the
# Flower check) at its floor, and transitive ones at their newest.
FLOORS := .venv-floors
FLOOR_TESTS := tests/test_mint.py tests/test_with_user_tokens.py tests/test_nightly.py \
	tests/test_worker.py tests/test_redis_transport.py tests/test_metrics.py \
	tests/test_tls_redis.py tests/test_celery_internals.py tests/test_lanes.py
# Left out at the floors: the whole-worker crash test. Before kombu 5.7 kombu sweeps for a
# dead worker's messages only every ~100 s, so it passes there, but 100 s later
# (docs/reference/supported-versions.md).
FLOOR_DESELECT := not test_killed_worker_replaced_by_another

test-floors: $(STAMP)
	.ci/ensure-redis
	rm -rf $(FLOORS)
	$(BIN)/uv venv --quiet --python $(PYTHON) $(FLOORS)
	$(BIN)/uv pip install --quiet --python $(FLOORS)/bin/python --resolution lowest-direct \
		-e . 'pytest>=8' 'pytest-timeout>=2.3'
	$(BIN)/uv pip list --python $(FLOORS)/bin/python 2>/dev/null \
		| grep -iE '^(celery|kombu|redis|requests|tenacity|cryptography|prometheus.client|flower) '
	$(FLOORS)/bin/python --version
	$(FLOORS)/bin/python -m pytest $(FLOOR_TESTS) -k '$(FLOOR_DESELECT)' $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check tasks tests bench
	$(BIN)/ruff format --check tasks tests bench

# Extra arguments for bench/run.py: make bench BENCH_ARGS="--concurrency 8"
BENCH_ARGS ?=

bench: $(STAMP)
	.ci/ensure-redis
	$(BIN)/python -m bench.run $(BENCH_ARGS)

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(FLOORS) .pytest_cache .mypy_cache .ruff_cache *.egg-info
