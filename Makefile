# make run  : install if needed, serve the default model on http://127.0.0.1:8000
# make test : install if needed, lint and run the whole suite
# make bench: install if needed, run the benchmark against XLA Keras (loopback only; needs wrk)
# make image-test: build the Dockerfile with podman and test the image as we deploy it
# make mutation: install if needed, mutation-test the modules that decide correctness (slow)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TOOLS  := .venv-tools
CLIENT := .venv-client
HOST   ?= 127.0.0.1
PORT   ?= 8000
IMAGE  ?= localhost/bigru-serve:image-test

# The three virtual environments install side by side, and lint runs while the kernel builds.
ifeq ($(MAKELEVEL),0)
MAKEFLAGS += --jobs=3
endif

.PHONY: install run test image-test image-build image-check lint bench startup soak flood peak-rss engine-memory wire parse-cost mutation constraints proto clean

install: $(VENV)/.installed $(VENV)/.kernel $(TOOLS)/.installed $(CLIENT)/.installed

# uv installs the environments: it unpacks and compiles wheels in parallel, in a fraction of
# pip's time (docs/development.md), and makes .pyc files up front as pip does, so that no
# process pays for compiling TensorFlow's sources at import.
UV_VERSION := 0.13.10
# The system's CA bundle, as pip uses it (a TLS-intercepting proxy's CA is there).
export UV_NATIVE_TLS := 1
UV := .venv-uv/bin/uv
UV_INSTALL = $(UV) pip install -q --compile-bytecode --python

$(UV):
	$(PYTHON) -m venv .venv-uv
	.venv-uv/bin/pip install -q uv==$(UV_VERSION)

# The native engine's kernel, rebuilt in place when its source changes (the editable install
# builds it once: a library newer than its sources is kept).
$(VENV)/.kernel: app/engine/recurrence.c setup.py $(VENV)/.installed
	[ -n "$$(find app/engine -name '_recurrence*.so' -newer app/engine/recurrence.c -newer setup.py)" ] \
		|| $(BIN)/python setup.py -q build_ext --inplace
	touch $@

$(VENV)/.installed: pyproject.toml setup.py constraints.txt | $(UV)
	$(UV) venv -q --allow-existing --python $(PYTHON) $(VENV)
	$(UV_INSTALL) $(BIN)/python -c constraints.txt -e '.[dev]'
	# tf-keras (the tests' reference) requires the full `tensorflow` wheel, which would install
	# its files over tensorflow-cpu: add it alone, so .venv runs the TensorFlow production runs.
	$(UV_INSTALL) $(BIN)/python --no-deps $$(grep -i '^tf[-_]keras==' constraints.txt)
	! $(UV) pip show -q --python $(BIN)/python tensorflow 2>/dev/null || { echo "only tensorflow-cpu may be installed" >&2; exit 1; }
	touch $@

# docker-compose 1.x (for `docker-compose config` in the tests) pins old libraries, so it
# lives in a venv of its own; its PyYAML 5 only builds with Cython < 3.
$(TOOLS)/.installed: | $(UV)
	$(UV) venv -q --allow-existing --python $(PYTHON) $(TOOLS)
	echo 'cython<3' > $(TOOLS)/constraints.txt
	$(UV_INSTALL) $(TOOLS)/bin/python --build-constraints $(TOOLS)/constraints.txt docker-compose==1.29.2
	touch $@

# tritonclient, the Open Inference Protocol client the tests drive the service with, pins
# protobuf < 7 and ml-dtypes <= 0.5.4, which TensorFlow 2.21's environment can't share: like a
# user's client program, it lives in a venv of its own (tests/triton_client.py runs there).
$(CLIENT)/.installed: constraints-client.txt | $(UV)
	$(UV) venv -q --allow-existing --python $(PYTHON) $(CLIENT)
	$(UV_INSTALL) $(CLIENT)/bin/python -c constraints-client.txt 'tritonclient[http,grpc]'
	touch $@

run: $(VENV)/.installed $(VENV)/.kernel
	HOST=$(HOST) PORT=$(PORT) $(BIN)/python -m app serve

# ruff, and the import contracts of pyproject.toml ([tool.importlinter]): layers, no cycles.
lint: $(VENV)/.installed
	$(BIN)/ruff check app tests bench examples mutation
	PYTHONPATH=$(CURDIR) $(BIN)/lint-imports --no-cache

# Parallel workers (pytest-xdist, one per core), each given a whole file (or test class) at a
# time, so that a file's module-scoped servers start once, longest first (tests/conftest.py);
# TEST_WORKERS=0 runs the suite in one process.
# Tests marked `alone` time a burst of requests: they run after the workers, by themselves.
# Both runs share one conversion cache (TEST_MODEL_CACHE_DIR): the default model converts once.
TEST_WORKERS ?= auto
test: install lint
	cache=$$(mktemp -d) && export TEST_MODEL_CACHE_DIR=$${TEST_MODEL_CACHE_DIR:-$$cache} && \
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder -m "not alone" && \
	$(BIN)/pytest -m alone; status=$$?; rm -rf "$$cache"; exit $$status

# The image from our Dockerfile, built by podman on a local stand-in for its base image and run
# read-only under the manifest's memory limit (tests/image/, tests/test_image.py). Needs root,
# podman, runc and debootstrap (Debian packages; .ci/run installs them). -rP prints the figures.
image-test:
	$(MAKE) image-build
	$(MAKE) image-check

image-build:
	tests/image/build.sh $(IMAGE)

# The tests of an image already built (.ci/run builds it while the suite runs).
image-check: $(VENV)/.installed
	IMAGE_TEST=$(IMAGE) $(BIN)/pytest -raP tests/test_image.py

# Needs wrk (Debian: apt-get install wrk); BENCH_ARGS=--readme pastes the tables into docs/benchmark.md.
bench: $(VENV)/.installed $(VENV)/.kernel
	@command -v wrk >/dev/null || { echo "make bench needs wrk (Debian: apt-get install wrk)"; exit 1; }
	$(BIN)/python -m bench $(BENCH_ARGS)

# Time to ready and memory of each phase, cold (the Keras conversion runs) and warm (cache hit).
startup: $(VENV)/.installed
	$(BIN)/python -m bench.startup

# Bounded soak on loopback: mixed traffic for SOAK_SECONDS (default 600), RSS and errors.
soak: $(VENV)/.installed
	$(BIN)/python -m bench.soak

# Far more concurrent work than the queue holds: every answer a correct 200 or a fast 503.
flood: $(VENV)/.installed
	$(BIN)/python -m bench.flood

# Peak RSS of the maximal request (64 x 2048 tokens, return_hidden), alone and four at once;
# then the same inside a 512 MiB memory cgroup (needs root), as our deployment files declare.
peak-rss: $(VENV)/.installed
	$(BIN)/python -m bench.peak_rss
	$(BIN)/python -m bench.peak_rss --memory-limit 512m

# ONNX Runtime's memory settings side by side: CPU per call and RSS after bursts (docs/memory.md).
engine-memory: $(VENV)/.installed
	$(BIN)/python -m bench.engine_memory

# A 64 x 2048 answer with hidden states: bytes, time and server memory per wire format.
wire: $(VENV)/.installed
	$(BIN)/python -m bench.wire_cost

# What a parsed request body holds, per byte and per value, against what the body is priced.
parse-cost: $(VENV)/.installed
	$(BIN)/python -m bench.parse_cost

# mutmut against each module's fast tests; prints the kill rate per module (target 90%).
mutation: $(VENV)/.installed
	$(BIN)/python -m mutation

constraints: $(VENV)/.installed
	{ sed -n '1,2p' constraints.txt; $(UV) pip freeze --python $(BIN)/python --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt

# Regenerate the committed gRPC modules from the Open Inference Protocol's .proto (grpcio-tools;
# tests/test_kserve.py checks they are up to date).
proto: $(VENV)/.installed
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		app/api/kserve/grpc_predict_v2.proto

clean:
	rm -rf $(VENV) $(TOOLS) $(CLIENT) .venv-uv .pytest_cache .ruff_cache
