# Two entry points for a fresh Debian/Ubuntu machine, as root:
#   make up    install everything, then run the example stack
#   make test  install everything, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXAMPLE ?= examples/pipeline/stack.toml

.PHONY: setup up test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install-system-deps
	./scripts/install-system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

up: setup
	$(BIN)/stackd -f $(EXAMPLE) up

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check stackd tests
	$(BIN)/mypy stackd

BENCHMARKS ?= launch network stack logs publish control fixture

bench: setup
	./scripts/install-bench-deps
	set -e; for b in $(BENCHMARKS); do echo "== benchmarks/$$b.py"; $(BIN)/python benchmarks/$$b.py; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
