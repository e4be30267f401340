# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and (re)install when pyproject.toml changed.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# torch first, by exact version: the CPU wheel is on disk; other specs pull CUDA builds.
TORCH := torch==2.13.0

.PHONY: demo test install install-dev lint typecheck bench clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP) $@

install: $(STAMP)

install-dev: $(DEV_STAMP) chromium

# The dashboard's browser test drives Debian's chromium through Playwright (never a downloaded browser).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }

demo: $(STAMP)
	$(BIN)/consortium demo

test: $(DEV_STAMP) chromium
	$(BIN)/python -m pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests benchmarks

typecheck: $(DEV_STAMP)
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) build dist src/*.egg-info
