# policyd — the two commands a new user needs:
#   make run    serve the example configuration (postfix-examples/policyd.yaml) on loopback
#   make test   install everything (Python venv, Postfix from Debian) and run every gate

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= postfix-examples/policyd.yaml

.PHONY: run test lint typecheck pytest system-deps venv bench bench-limits clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# --no-transport-table: the example's outbound.transport_table (/var/lib/policyd, postmap) is
# for a Postfix host; `make run` only shows policyd answering, as any user, without Postfix.
run: venv
	$(BIN)/policyd serve --config $(CONFIG) --verbose --no-transport-table

system-deps:
	bash scripts/install-system-deps.sh

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest

test: system-deps venv lint typecheck pytest

# make bench [BENCH_ARGS="--quick"]: policyd beside the minimal responder and postfwd2 (see
# docs/benchmark.md); system-deps brings Postfix and postfwd for the comparisons.
BENCH_ARGS ?=
bench: system-deps venv
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/limits.py $(BENCH_LIMITS_ARGS)

# make bench-limits [BENCH_LIMITS_ARGS="--quick"]: only the sending-limits part (bench/limits.py):
# limits off, in process and in Redis side by side, and Redis failing under load.
BENCH_LIMITS_ARGS ?=
bench-limits: system-deps venv
	$(BIN)/python bench/limits.py $(BENCH_LIMITS_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
