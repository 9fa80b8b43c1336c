# cityops — the commands a user needs. `make up`, `make test`, `make bench`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install stack-up stack-down stack-status migrate test test-unit test-integration test-edge-faults lint up down bench bench-quick schemas

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -U pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]' --config-settings editable_mode=compat
	@touch $@

stack-up: install
	$(BIN)/cityops stack up

stack-down: install
	$(BIN)/cityops stack down

stack-status: install
	$(BIN)/cityops stack status

# `cityops stack env` prints the path of the CITYOPS_* settings file `stack up` wrote.
migrate: stack-up
	set -a && source "$$($(BIN)/cityops stack env)" && set +a && $(BIN)/cityops migrate

# The edge fault suite (own brokers, faults under load, ~3 min) runs as a stage of its own.
test: install stack-up migrate
	set -a && source "$$($(BIN)/cityops stack env)" && set +a && $(BIN)/pytest -q -p no:cacheprovider -m "not edge_faults"
	set -a && source "$$($(BIN)/cityops stack env)" && set +a && $(BIN)/pytest -q -p no:cacheprovider -m edge_faults tests/integration

test-edge-faults: install stack-up migrate
	set -a && source "$$($(BIN)/cityops stack env)" && set +a && $(BIN)/pytest -q -p no:cacheprovider -m edge_faults tests/integration

test-integration: install stack-up migrate
	set -a && source "$$($(BIN)/cityops stack env)" && set +a && $(BIN)/pytest -q -p no:cacheprovider -m "not edge_faults" tests/integration

test-unit: install
	$(BIN)/pytest -q tests/unit

lint: install
	$(BIN)/ruff check cityops bench tests
	$(BIN)/ruff format --check cityops bench tests
	$(BIN)/mypy cityops bench tests

schemas: install
	$(BIN)/python -m cityops.common.schemas docs/schemas
	$(BIN)/python -m cityops.api.openapi docs/openapi.json

up: install stack-up migrate
	$(BIN)/cityops stack services up

down: install
	-$(BIN)/cityops stack services down
	$(BIN)/cityops stack down

bench: install stack-up migrate
	$(BIN)/python -m bench --out docs/benchmarks.md

bench-quick: install stack-up migrate
	$(BIN)/python -m bench --quick --out /tmp/cityops-bench-quick.md
