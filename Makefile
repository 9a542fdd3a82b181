# The two commands a newcomer needs: `make pipeline` (install + run the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install pipeline test lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

pipeline: install
	$(BIN)/recsys pipeline

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
