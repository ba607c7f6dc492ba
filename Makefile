# policyd — the two commands a new user needs:
#   make run    serve the example configuration (postfix-examples/policyd.yaml) on loopback
#   make test   install everything (Python venv, Postfix from Debian) and run every gate

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= postfix-examples/policyd.yaml

.PHONY: run test lint typecheck pytest system-deps venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

run: venv
	$(BIN)/policyd serve --config $(CONFIG) --verbose

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

bench: venv
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
