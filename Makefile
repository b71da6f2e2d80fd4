# Targets named in README.md. PY is the interpreter of the environment `make setup` builds.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup serve test lint typecheck unit integration bench

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -c constraints.txt -e ".[test]"

setup: $(PY)

serve: setup
	$(VENV)/bin/butd serve

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy store workers service

unit: setup
	$(PY) -m pytest tests/unit -q

integration: setup
	$(PY) -m pytest tests/integration -q

test: lint typecheck
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/detector.py
	$(PY) bench/store.py
	$(PY) bench/service.py
	$(PY) bench/heads.py
