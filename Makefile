# The two commands of the README: `make run` and `make test`.
# Both install what they need into .venv; `make test` installs redis-server
# (Debian package) when the binary is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test check lint typecheck bench install redis-server up

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,kubernetes]'

redis-server:
	@command -v redis-server >/dev/null 2>&1 || ./scripts/install-redis

run: install
	$(BIN)/tierpool run

# The Procfile's processes (Redis, 3 workers, simulated pods) under honcho.
up: install redis-server
	$(BIN)/python -m pip install -q honcho
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/honcho start -c worker=3

test: install redis-server
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

check: lint typecheck
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
typecheck: install
	$(BIN)/mypy

bench: install redis-server
	$(BIN)/tierpool bench
