# Two commands for an operator: `make demo` and `make test`. Both set up what they need first,
# and are quick when already set up.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test setup system bench bench-objects clean wheel-check

demo: setup
	$(BIN)/liftoff demo

# Two workers, each test file whole on one of them (its module-scoped servers are started once); each
# worker starts its own session stack, all report to the one Prefect server the controller starts.
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadfile

# The wheel installs and works on its own (every package and data file in it): scripts/check-wheel.sh.
# .ci/run runs it after the tests.
wheel-check: system
	@bash scripts/check-wheel.sh

bench: setup
	$(BIN)/python bench/db_copy.py

bench-objects: setup
	@bash scripts/install-system-deps.sh bench
	$(BIN)/python bench/objects.py

setup: system $(STAMP)

system:
	@bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache
