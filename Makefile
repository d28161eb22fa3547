# The README's two commands: `make demo` (demo upstreams + gateway in the
# foreground) and `make test` (the whole suite, as CI runs it).

SHELL := /bin/bash
# The machine's own python3; the venv pins the project to it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
PYTEST_ARGS ?=
# make demo's ports, as make variables or environment: make demo DEMO_PORT=9000
DEMO_PORT ?= 8000
DEMO_SERVICE1_PORT ?= 5001
DEMO_SERVICE2_PORT ?= 5002

.PHONY: demo test promtool

# The gateway listens on 127.0.0.1 only, without a pidfile (a daemon started
# from this folder keeps its twistd.pid), on a config written by the demo
# upstreams once they listen: if they cannot, make demo stops right there.
demo: $(VENV)/.installed-demo
	@set -euo pipefail; \
	if [ -z "$${MASTER_KEY:-}" ] && ! grep -qsE '^[[:space:]]*(export[[:space:]]+)?MASTER_KEY=' .env; then \
	  export MASTER_KEY=supersecret; \
	  echo "make demo: MASTER_KEY is not set, using the README's demo key 'supersecret' for this demo only (twistd apigw has no default; set your own outside the demo)"; \
	fi; \
	scratch=$$(mktemp -d); config=$$scratch/gateway_config.yaml; backends=; \
	trap 'if [ -n "$$backends" ]; then kill $$backends 2>/dev/null || true; wait $$backends 2>/dev/null || true; fi; rm -rf "$$scratch"' EXIT; \
	$(BIN)/python -m apigw.demo --port1 $(DEMO_SERVICE1_PORT) --port2 $(DEMO_SERVICE2_PORT) \
	  --write-config "$$config" & backends=$$!; \
	until [ -e "$$config" ]; do \
	  if ! kill -0 $$backends 2>/dev/null; then \
	    echo "make demo: the demo upstreams did not start (see above)" >&2; exit 1; \
	  fi; \
	  sleep 0.1; \
	done; \
	$(BIN)/twistd -n --pidfile= apigw --config "$$config" \
	  --port tcp:$(DEMO_PORT):interface=127.0.0.1

test: $(VENV)/.installed-test promtool
	PATH="$$PATH:$(CURDIR)/$(BIN)" $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# promtool checks the /metrics output; prometheus evaluates every query of
# contrib/grafana/apigw-dashboard.json against a gateway under traffic. Only
# their binaries are taken from Debian's prometheus package (apt-get download
# + dpkg -x, nothing installed): installing the package would also enable and
# start a Prometheus server. System binaries win; tests that need one skip
# when neither is there.
promtool: | $(BIN)/python
	@set -u; \
	need=; \
	for tool in promtool prometheus; do \
	  if ! [ -x "$$(command -v $$tool)" ] && ! [ -x $(BIN)/$$tool ]; then need="$$need $$tool"; fi; \
	done; \
	if [ -z "$$need" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then \
	  echo "make test:$$need missing and apt-get/dpkg are not here; tests that need them will skip"; \
	  exit 0; \
	fi; \
	echo "make test: fetching$$need into $(BIN) (Debian package prometheus, unpacked, not installed)"; \
	log=$(CURDIR)/$(VENV)/promtool-fetch.log; tmp=$$(mktemp -d); chmod 755 "$$tmp"; \
	if (cd "$$tmp" \
	    && { apt-get download prometheus || { apt-get update -q && apt-get download prometheus; }; } \
	    && dpkg -x prometheus_*.deb unpacked) >"$$log" 2>&1 \
	   && (for tool in $$need; do cp "$$tmp/unpacked/usr/bin/$$tool" $(BIN)/$$tool || exit 1; done); then :; \
	else \
	  tail -n 5 "$$log"; \
	  echo "make test: could not fetch$$need; tests that need them will skip"; \
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
