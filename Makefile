# xrayq — two commands to start: `make run` (the embedded stack) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-unit test-integration test-e2e lint format bench compose-check clean

install: $(STAMP)

# Re-installs only when pyproject.toml changes. torch>=2.14 comes from PyPI (never the local 2.13 CPU
# wheel, which has no matching torchvision).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: install
	$(BIN)/xrayq up

test: install
	$(BIN)/python -m pytest

test-unit: install
	$(BIN)/python -m pytest tests/unit

test-integration: install
	$(BIN)/python -m pytest tests/integration

test-e2e: install
	$(BIN)/python -m pytest tests/e2e

lint: install
	$(BIN)/ruff check shared services tests
	$(BIN)/ruff format --check shared services tests
	$(BIN)/mypy shared services

format: install
	$(BIN)/ruff format shared services tests
	$(BIN)/ruff check --fix shared services tests

compose-check:
	docker-compose config -q

clean:
	rm -rf .xrayq .pytest_cache .mypy_cache .ruff_cache
