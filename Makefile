# make run  : install if needed, serve the default model on http://127.0.0.1:8000
# make test : install if needed, lint and run the whole suite
# make bench: install if needed, run the latency/throughput benchmark (loopback only)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TOOLS  := .venv-tools
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install run test lint bench clean

install: $(VENV)/.installed $(TOOLS)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# docker-compose 1.x (for `docker-compose config` in the tests) pins old libraries, so it
# lives in a venv of its own; its PyYAML 5 only builds with Cython < 3.
$(TOOLS)/.installed:
	$(PYTHON) -m venv $(TOOLS)
	echo 'cython<3' > $(TOOLS)/constraints.txt
	PIP_CONSTRAINT=$(CURDIR)/$(TOOLS)/constraints.txt $(TOOLS)/bin/pip install -q docker-compose==1.29.2
	touch $@

run: $(VENV)/.installed
	$(BIN)/uvicorn app.main:app --host $(HOST) --port $(PORT) --proxy-headers --no-access-log

lint: $(VENV)/.installed
	$(BIN)/ruff check app tests bench examples

test: install lint
	$(BIN)/pytest

bench: $(VENV)/.installed
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache .ruff_cache
