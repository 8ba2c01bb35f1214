# make run  : install if needed, serve the default model on http://127.0.0.1:8000
# make test : install if needed, lint and run the whole suite
# make bench: install if needed, run the latency/throughput benchmark (loopback only)
# make mutation: install if needed, mutation-test the modules that decide correctness (slow)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TOOLS  := .venv-tools
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install run test lint bench soak flood mutation constraints clean

install: $(VENV)/.installed $(TOOLS)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# docker-compose 1.x (for `docker-compose config` in the tests) pins old libraries, so it
# lives in a venv of its own; its PyYAML 5 only builds with Cython < 3.
$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	echo 'cython<3' > $(TOOLS)/constraints.txt
	PIP_CONSTRAINT=$(CURDIR)/$(TOOLS)/constraints.txt $(TOOLS)/bin/pip install -q docker-compose==1.29.2
	touch $@

run: $(VENV)/.installed
	HOST=$(HOST) PORT=$(PORT) $(BIN)/python -m app serve

lint: $(VENV)/.installed
	$(BIN)/ruff check app tests bench examples mutation

test: install lint
	$(BIN)/pytest

bench: $(VENV)/.installed
	$(BIN)/python -m bench

# Bounded soak on loopback: mixed traffic for SOAK_SECONDS (default 600), RSS and errors.
soak: $(VENV)/.installed
	$(BIN)/python -m bench.soak

# Far more concurrent work than the queue holds: every answer a correct 200 or a fast 503.
flood: $(VENV)/.installed
	$(BIN)/python -m bench.flood

# mutmut against each module's fast tests; prints the kill rate per module (target 90%).
mutation: $(VENV)/.installed
	$(BIN)/python -m mutation

constraints: $(VENV)/.installed
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -v '^-e'; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache
