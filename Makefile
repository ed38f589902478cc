# xrayq — two commands to start: `make run` (the embedded stack) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install lock run test test-unit test-integration test-e2e lint format bench locust compose-check clean

install: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt changes, at the versions constraints.txt pins
# (as the image does). torch>=2.14 comes from PyPI (never the local 2.13 CPU wheel, which has no
# matching torchvision).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# constraints.txt pins every package pyproject.toml brings (its dev and load extras too) for Linux and
# Python 3.11. Run after changing pyproject.toml's dependencies: pins that still fit are kept;
# `make lock UPGRADE=1` moves every pin to the newest release.
LOCK_FLAGS := --extra dev --extra load --python-version 3.11 --python-platform linux --custom-compile-command "make lock"
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet "uv>=0.5"
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) $(if $(UPGRADE),--upgrade) --output-file constraints.txt

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
	$(BIN)/ruff check shared services tests loadtest
	$(BIN)/ruff format --check shared services tests loadtest
	$(BIN)/mypy shared services

format: install
	$(BIN)/ruff format shared services tests loadtest
	$(BIN)/ruff check --fix shared services tests loadtest

# Benchmark the stack at XRAYQ_PUBLIC_URL (starting `xrayq up` with the same settings if none answers).
bench: install
	$(BIN)/python -m loadtest.bench --start --output bench-$$(date +%Y%m%d-%H%M%S).json

# Interactive load test: open http://localhost:8089 (or add --headless -u 40 -r 10 -t 60s).
locust: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[load]"
	$(BIN)/locust -f loadtest/locustfile.py --host $${XRAYQ_PUBLIC_URL:-http://127.0.0.1:8000}

compose-check:
	docker-compose config -q

clean:
	rm -rf .xrayq .pytest_cache .mypy_cache .ruff_cache
