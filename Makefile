# The two commands a newcomer needs: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-boot lint bench install clean

$(BIN)/probe: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/probe

demo: install
	$(BIN)/collector demo

lint: install
	$(BIN)/ruff check probe collector tests bench dashboards
	$(BIN)/ruff format --check probe collector tests bench dashboards
	$(BIN)/mypy

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
