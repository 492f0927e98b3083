# One command each: `make demo` runs the main job, `make test` the whole suite,
# `make bench` the benchmark (about 40 minutes with the nightly and egress sections, an
# estimate until they have had a full run; writes bench/RESULTS.md).
# Both create .venv and install the project into it first when needed.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck check clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sfox-tokens demo

test: $(STAMP)
	.ci/ensure-redis
	$(BIN)/ruff check tasks tests bench celeryconfig.py
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check tasks tests bench celeryconfig.py
	$(BIN)/ruff format --check tasks tests bench celeryconfig.py

# Extra arguments for bench/run.py: make bench BENCH_ARGS="--concurrency 8"
BENCH_ARGS ?=

bench: $(STAMP)
	.ci/ensure-redis
	$(BIN)/python -m bench.run $(BENCH_ARGS)

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
