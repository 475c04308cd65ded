# The README's commands. Each target installs what it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test test-fast lint bench clean browser-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, from the spec, so nothing later pulls a different (CUDA) build
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/recsys up

test: install browser-deps
	$(BIN)/python -m pytest

# Headless Chromium for the browser tests, from Debian (never `playwright install`); skipped when present.
# It says what it installs and why before apt-get runs, so nothing is installed silently.
browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  if ! command -v apt-get >/dev/null 2>&1; then echo "no chromium and no apt-get: browser tests will skip"; exit 0; fi; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "browser-deps: installing the Debian package chromium (about 350 MB with its libraries) with $${SUDO:+sudo }apt-get:"; \
	  echo "  the browser tests (pytest -m browser) drive the admin pages in headless Chromium."; \
	  echo "  'make test-fast' runs the tests without it; without Chromium the browser tests skip."; \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q chromium; }

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not browser"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
