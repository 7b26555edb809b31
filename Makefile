# Registry Cache: every entry point a user or CI needs.
# `make install` sets up this host as cache + Docker client; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= run/config.yml
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help deps venv config install uninstall run test unit integration lint molecule bench clean

help:
	@echo "make install    set up this host as a registry cache and as its Docker client"
	@echo "make uninstall  take that away again (the cache data and CA stay)"
	@echo "make config     ask for the inventory variables, write inventory/"
	@echo "make run        run the proxy in the foreground with $(CONFIG)"
	@echo "make test       every test: lint, unit + integration, Molecule"
	@echo "make bench      benchmark figures, written to docs/BENCHMARKS.md"

# Debian packages the tests and benchmark use (idempotent; skips apt when all are present).
deps:
	bash scripts/install-deps.sh

$(BIN)/registry-cache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev]'
	touch $@

venv: $(BIN)/registry-cache

config: venv
	$(BIN)/python scripts/configure.py

install:
	bash scripts/install-local.sh

uninstall:
	bash scripts/install-local.sh --uninstall

run: venv
	bash scripts/run-dev.sh $(CONFIG)

lint: venv
	$(BIN)/ruff check proxy_app tests scripts molecule bench roles
	$(BIN)/ruff format --check proxy_app tests scripts molecule bench roles
	$(BIN)/mypy proxy_app
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint --profile production

unit: venv
	$(BIN)/pytest -m "not integration" tests

integration: deps venv
	$(BIN)/pytest -m integration tests

# Debian 12: default (the fleet: every client runtime, refusals, CA rotation, absent) and
# local (make install). Debian 13: cluster (two cache nodes on one SeaweedFS bucket, Docker
# and containerd clients), so that both releases run the cache and its clients without a
# third fleet run (CI's time).
molecule: deps venv
	bash scripts/ensure-dockerd.sh
	bash molecule/images/build.sh
	cd $(CURDIR) && $(BIN)/molecule test --all --exclude cluster
	bash molecule/run-distro.sh trixie cluster

test: deps venv lint
	$(BIN)/pytest tests
	$(MAKE) molecule

bench: deps venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) run build dist *.egg-info
