# The README's two commands: `make demo` (demo upstreams + gateway in the
# foreground) and `make test` (the whole suite, as CI runs it).

SHELL := /bin/bash
# The machine's own python3; the venv pins the project to it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=

.PHONY: demo test promtool

demo: $(VENV)/.installed-demo
	@set -euo pipefail; \
	if [ -z "$${MASTER_KEY:-}" ] && ! grep -qsE '^[[:space:]]*(export[[:space:]]+)?MASTER_KEY=' .env; then \
	  export MASTER_KEY=supersecret; \
	  echo "make demo: MASTER_KEY is not set, using the README's demo key (set your own outside the demo)"; \
	fi; \
	$(BIN)/python -m apigw.demo & backends=$$!; \
	trap 'kill $$backends 2>/dev/null || true; wait $$backends 2>/dev/null || true' EXIT; \
	$(BIN)/twistd -n apigw --config gateway_config.yaml

test: $(VENV)/.installed-test promtool
	PATH="$$PATH:$(CURDIR)/$(BIN)" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# promtool checks the /metrics output. Only its binary is taken from Debian's
# prometheus package (apt-get download + dpkg -x, nothing installed):
# installing the package would also enable and start a Prometheus server.
# A system promtool wins; tests that need one skip when neither is there.
promtool: | $(BIN)/python
	@set -u; \
	if [ -x "$$(command -v promtool)" ] || [ -x $(BIN)/promtool ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then \
	  echo "make test: promtool is missing and apt-get/dpkg are not here; tests that need it will skip"; \
	  exit 0; \
	fi; \
	echo "make test: fetching promtool into $(BIN) (Debian package prometheus, unpacked, not installed)"; \
	log=$(CURDIR)/$(VENV)/promtool-fetch.log; tmp=$$(mktemp -d); chmod 755 "$$tmp"; \
	if (cd "$$tmp" \
	    && { apt-get download prometheus || { apt-get update -q && apt-get download prometheus; }; } \
	    && dpkg -x prometheus_*.deb unpacked) >"$$log" 2>&1 \
	   && cp "$$tmp/unpacked/usr/bin/promtool" $(BIN)/promtool; then :; \
	else \
	  tail -n 5 "$$log"; \
	  echo "make test: could not fetch promtool; tests that need it will skip"; \
	fi; \
	rm -rf "$$tmp"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when the packaging changes (the install is editable).
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(PIP) install -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test]'
	@touch $@ $(VENV)/.installed-demo
