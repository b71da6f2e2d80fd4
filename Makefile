# Targets named in README.md. PY is the interpreter of the environment the install targets build.
#
#   make serve [PORT=8001] [STORE=/data/butd-store] [HOST=0.0.0.0]   runtime packages only
#   make test                                                        + the [test] extra
#   make test-all                                                    + the `slow` tests
VENV ?= .venv
PY := $(VENV)/bin/python
# `make serve` options; empty = the BUTD_* environment or the built-in default
# (127.0.0.1, port 8000, store ./butd-store).
PORT ?=
STORE ?=
HOST ?=

# Stamps: the runtime install, then the test extra on top. Rebuilt when the dependencies change.
RUNTIME := $(VENV)/.installed-runtime
TESTENV := $(VENV)/.installed-test

.PHONY: setup setup-test serve test test-all lint typecheck unit integration bench

$(RUNTIME): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install -c constraints.txt -e .
	touch $@

$(TESTENV): $(RUNTIME)
	$(PY) -m pip install -c constraints.txt -e ".[test]"
	touch $@

setup: $(RUNTIME)

setup-test: $(TESTENV)

serve: setup
	$(VENV)/bin/butd serve $(if $(PORT),--port $(PORT)) $(if $(STORE),--store-dir $(STORE)) \
		$(if $(HOST),--host $(HOST))

lint: setup-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# mypy cannot follow setuptools' editable import hook (butd.service -> service/), so it checks
# a tree of links laid out as the installed package: build/typecheck/butd/{cli,service,...}.
TYPECHECK := build/typecheck
typecheck: setup-test
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/butd
	for f in butd/*; do ln -s "$(CURDIR)/$$f" $(TYPECHECK)/butd/; done
	for d in detector store workers service heads; do ln -s "$(CURDIR)/$$d" $(TYPECHECK)/butd/$$d; done
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		-m butd -m butd.client -m butd.images -p butd.cli -p butd.store -p butd.workers -p butd.service

unit: setup-test
	$(PY) -m pytest tests/unit -q -m "not slow"

integration: setup-test
	$(PY) -m pytest tests/integration -q -m "not slow"

# The fast suite (what CI runs): everything but the `slow` learning proofs and full-size nets.
test: lint typecheck
	$(PY) -m pytest -q -m "not slow" --durations=10

# Everything, the `slow` tests included (minutes more on a CPU).
test-all: lint typecheck
	$(PY) -m pytest -q

bench: setup-test
	$(PY) bench/detector.py
	$(PY) bench/store.py
	$(PY) bench/service.py
	$(PY) bench/heads.py
