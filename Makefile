# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-boot lint bench install clean

# Two installs into one virtualenv: what the product and the demo need (`make demo`), and
# the test tools on top (`make test`). Both come from the package index pip is configured for.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed-test

# The whole fleet on loopback until Ctrl-C (fleet/: lab resolvers, collector, three probes, Prometheus).
demo: $(VENV)/.installed
	$(BIN)/python -m fleet

lint: install
	$(BIN)/ruff check probe collector fleet tests bench dashboards
	$(BIN)/ruff format --check probe collector fleet tests bench dashboards
	$(BIN)/mypy  # checks the packages listed in pyproject.toml: probe collector dashboards fleet tests bench

test: install
	scripts/system-deps
	$(MAKE) lint
	$(BIN)/pytest -q -rs

# Slow: boots the Ansible-converged Debian tree with systemd-nspawn.
test-boot: install
	scripts/system-deps
	$(BIN)/pytest -q -rs -m boot tests/test_ansible_boot.py

bench: install
	scripts/system-deps
	$(BIN)/python -m bench.transports

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
