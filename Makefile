# vitquant: two commands, each self-sufficient on a fresh Debian machine.
#   make demo          train a small ViT on Fashion-MNIST and print the results table
#   make demo QUICK=1  the < 5 minute version
#   make test          the test suite
# Both create .venv (torch pinned first: an unpinned torch pulls gigabytes of CUDA wheels), install
# the package, and install the Fashion-MNIST Debian package when run as root. Re-running is fast:
# the venv is stamped with a hash of pyproject.toml and only rebuilt when that file changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH := torch==2.13.0
DATA ?= /usr/share/datasets/fashion-mnist
PYTEST_ARGS ?= -n 2
QUICK ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitquant-setup-$(shell sha1sum pyproject.toml 2>/dev/null | cut -c1-12)

.PHONY: help setup data demo test lint clean

help:
	@echo "make demo [QUICK=1] [OUT=dir]  float, PTQ, QAT, DiffQ, export, int8 rows on Fashion-MNIST (runs cached in runs/demo)"
	@echo "make test             run the test suite"
	@echo "make setup | data | lint | clean"

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then \
	  $(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); \
	    else echo "cannot create $(VENV): install python3-venv (apt-get install python3-venv)"; exit 1; fi; }; \
	fi
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,timm]" "$(TORCH)"
	@rm -f $(VENV)/.vitquant-setup-*
	@touch $@

data:
	@if [ -d "$(DATA)" ]; then \
	  true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found at $(DATA): run 'sudo apt-get install dataset-fashion-mnist'"; \
	  echo "or put the four IDX files in a folder and pass DATA=<folder> (VITQUANT_DATA)"; \
	fi

demo: setup data
	VITQUANT_DATA=$(DATA) HF_HUB_OFFLINE=1 $(VENV)/bin/vitquant demo $(if $(QUICK),--quick,) $(if $(OUT),--out $(OUT),)

# two xdist workers with one thread each: faster on 2 cores than one process with two threads
test: setup data
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/pytest $(PYTEST_ARGS) -q

lint: setup
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests
	$(VENV)/bin/lint-imports --no-cache

clean:
	rm -rf runs/demo .pytest_cache
