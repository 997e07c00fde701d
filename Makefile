# The two commands a new user runs: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed

.PHONY: setup serve test clean

# Setup is idempotent: the stamp is rebuilt only when pyproject.toml changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The pinned CPU wheel goes in first: an unpinned torch would pull gigabytes of CUDA.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The native CPU decode step is compiled once per machine (cached in ~/.cache/kiln); without a C++
# compiler this prints why and the server uses the torch path.
serve: setup
	$(BIN)/python -m model.native
	$(BIN)/kiln serve $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
