# pmmrec: the two commands of the README, plus lint.
#   make demo   set up .venv (if absent), then synthesise the built-in world and run the demo
#               (ARGS=--quick: a tiny world in about a minute; ARGS=--no-ablation: skip the two ablation pretrainings)
#   make test   set up .venv (if absent), then run the test suite
#   make ml1m   the MovieLens-1M table (scripts/ml1m_table.py; hours on CPU)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint setup clean ml1m

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

# The README's MovieLens-1M table (hours on CPU; needs ../shared/datasets/movielens-1m). ARGS=--seeds 0 1 2 etc.
ml1m: $(STAMP)
	$(BIN)/python scripts/ml1m_table.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts

clean:
	rm -rf $(VENV) runs .pytest_cache
