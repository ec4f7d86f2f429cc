# Two commands for a fresh machine (see README.md):
#   make book   - create the environment, fetch the default assets, execute the notebooks, build _build/html
#   make test   - unit tests, every notebook through nbval, a strict book build, and a check of the HTML
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PYTHONHASHSEED := 0
# The notebooks and tests share these two cores: one intra-op thread pool each is enough.
export OMP_NUM_THREADS ?= 2

.PHONY: env assets book test test-all unit notebooks book-strict check-book scorecard clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the local CPU build of torch first, so nothing below can pull a CUDA build
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test,book,math,train]"
	touch $@

env: $(VENV)/.installed

# The assets the default (CI-scale) build needs; everything else is fetched on first use.
assets: env
	$(PY) -m effllm_lib.assets --default

book: assets
	$(VENV)/bin/jupyter-book build .
	@echo "open _build/html/index.html"

unit: env
	$(PY) -m pytest -q -m "not slow and not device" tests

notebooks: assets
	$(PY) -m pytest -q --nbval-lax -p no:cacheprovider notebooks

book-strict: assets
	rm -rf _build
	$(VENV)/bin/jupyter-book build . -W -n --keep-going

check-book:
	$(PY) scripts/check_glue.py
	$(PY) scripts/check_book.py

test: assets
	$(MAKE) unit
	$(MAKE) notebooks
	$(MAKE) book-strict
	$(MAKE) check-book

# Everything, including tests that download large assets or take minutes.
test-all: assets
	$(PY) -m pytest -q tests
	$(MAKE) notebooks book-strict check-book

scorecard: env
	$(PY) -m effllm_lib.scorecard

clean:
	rm -rf _build .pytest_cache
