# The two commands a newcomer needs: `make pipeline` (install + run the main job) and `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install browser pipeline test lint bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

pipeline: install
	$(BIN)/recsys pipeline

# The dashboard's end-to-end test drives Debian's headless Chromium; install it where apt-get can (root).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium is not installed: the dashboard browser test will skip (apt-get install chromium)"; }

test: install browser
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
