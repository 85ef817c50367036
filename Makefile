# The README's commands. Each creates .venv and installs what it needs on first use.
# Another Python beside the default: make test PYTHON=/path/to/python3.9 VENV=.venv-3.9
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: test test-ha demo bench bench-quick lint soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.test: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@

$(VENV)/.dev: $(VENV)/.test
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(VENV)/.ha: $(VENV)/.test
	$(BIN)/pip install -q -e '.[ha]'
	touch $@

$(VENV)/.bench: $(VENV)/.test
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

test: $(VENV)/.test          ## the test suite, 4 xdist workers
	$(BIN)/pytest -n 4 -m "not slow and not patroni" $(PYTEST_ARGS)

test-ha: $(VENV)/.ha         ## the Patroni tier (needs etcd: apt-get install etcd-server)
	$(BIN)/pytest -m patroni $(PYTEST_ARGS)

demo: $(VENV)/.test          ## the pipeline demo on the embedded (or PGACCESS_DSN) server
	$(BIN)/pgaccess demo $(DEMO_ARGS)

bench: $(VENV)/.bench        ## pgaccess beside its peers, one run
	$(BIN)/python benchmarks/compare.py $(BENCH_ARGS)

bench-quick: $(VENV)/.bench
	$(BIN)/python benchmarks/compare.py --quick $(BENCH_ARGS)

.PHONY: bench-queue
bench-queue: $(VENV)/.bench  ## the job queue beside PgQueuer, pq, procrastinate (BENCH_ARGS=--quick: a smoke run)
	$(BIN)/python benchmarks/queue_bench.py $(BENCH_ARGS)

soak: $(VENV)/.test          ## the long reliability tests
	$(BIN)/pytest -n 4 -m slow $(PYTEST_ARGS)

lint: $(VENV)/.dev           ## ruff and mypy --strict
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy --strict src

clean:
	rm -rf $(VENV) .venv-* build dist src/*.egg-info .pgaccess
