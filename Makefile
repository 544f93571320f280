# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/conveyor-ready: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/conveyor-ready
	$(BIN)/conveyor demo

test: $(BIN)/conveyor-ready
	$(BIN)/python -m pytest -q

lint: $(BIN)/conveyor-ready
	$(BIN)/ruff check src tests bench scripts examples

bench: $(BIN)/conveyor-ready
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build src/*.egg-info
