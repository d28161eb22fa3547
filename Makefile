# The README's two commands: `make demo` (demo upstreams + gateway in the
# foreground) and `make test` (the whole suite, as CI runs it).

SHELL := /bin/bash
# The machine's own python3; the venv pins the project to it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: demo test

demo: $(VENV)/.installed-demo
	@set -euo pipefail; \
	if [ -z "$${MASTER_KEY:-}" ] && ! grep -qsE '^[[:space:]]*(export[[:space:]]+)?MASTER_KEY=' .env; then \
	  export MASTER_KEY=supersecret; \
	  echo "make demo: MASTER_KEY is not set, using the README's demo key (set your own outside the demo)"; \
	fi; \
	$(BIN)/python -m apigw.demo & backends=$$!; \
	trap 'kill $$backends 2>/dev/null || true; wait $$backends 2>/dev/null || true' EXIT; \
	$(BIN)/twistd -n apigw --config gateway_config.yaml

test: $(VENV)/.installed-test
	@if command -v promtool >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make test: installing promtool (Debian package prometheus)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  log=$(VENV)/apt-prometheus.log; \
	  { apt-get install -y -q --no-install-recommends prometheus \
	    || { apt-get update -q && apt-get install -y -q --no-install-recommends prometheus; }; } >"$$log" 2>&1 \
	  || { tail -n 5 "$$log"; echo "make test: could not install prometheus; tests that need promtool will skip"; }; \
	else \
	  echo "make test: promtool is missing and apt-get is not usable here; tests that need it will skip"; \
	fi
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when the packaging changes (the install is editable).
$(VENV)/.installed-demo: setup.py pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	@touch $@

$(VENV)/.installed-test: setup.py pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test]'
	@touch $@ $(VENV)/.installed-demo
