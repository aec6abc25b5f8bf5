# pmmrec: the two commands of the README, plus lint.
#   make demo   set up .venv (if absent), then synthesise the built-in world and run the demo
#               (ARGS=--quick: a tiny world in about a minute; ARGS=--no-ablation: skip the two ablation pretrainings)
#   make test   set up .venv (if absent), then run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint setup clean

setup: $(STAMP)

# torch==2.13.0 first: the CPU wheel lies on local disk, and installing it before anything else stops a
# dependency from pulling another (multi-GB CUDA) build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]' torch==2.13.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pmmrec demo --out runs/demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
