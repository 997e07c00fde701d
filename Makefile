# The two commands a new user runs: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed

.PHONY: setup serve test clean

# Setup is idempotent: the stamp is rebuilt only when pyproject.toml changes.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The pinned torch goes in first, the CPU build from PyTorch's CPU index (PyPI's Linux wheel is the
# CUDA one: gigabytes). With an NVIDIA driver installed (nvidia-smi on PATH) the index is left out and
# PyPI's CUDA build comes instead; `make TORCH_INDEX=URL ...` picks another index, `TORCH_INDEX=` none.
# (torch alone from that index; its dependencies, in the second line, from the usual one)
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --no-deps torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX) --retries 1)
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
