# Real-time CPU inference for cuDNN-trained (bidirectional) GRU models.
# Build:  docker build -t bigru-serve .
# Run:    docker run -p 8000:8000 -p 8001:8001 bigru-serve   (default model baked in, converted at build; 8001: gRPC)
#         docker run -p 8000:8000 -m 512m -v $PWD/my-model:/models/custom:ro -e MODEL_PATH=/models/custom bigru-serve
#         (a model of your own is converted at start-up in a child process, about 10 s and
#         a 305 MiB cgroup peak; see docs/operations.md, "Container", to convert it once instead)
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# A C compiler for the native engine's kernel (app/engine/recurrence.c); the final stage has none.
# Unpinned: the mirror serves only bookworm's current point release, and the compiler's output
# is checked by the tests, not its version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY app ./app
RUN /opt/venv/bin/pip install --no-cache-dir -c constraints.txt .
# Convert the baked-in default model now (the Keras 3 model, checked by Keras against its
# GPU outputs), so that the image starts in about a second: the service finds the conversion
# in MODEL_CACHE_DIR by the model's content hash. Run outside /src, from the installed package.
COPY models /models
WORKDIR /opt
RUN MODEL_CACHE_DIR=/opt/model-cache HOME=/tmp /opt/venv/bin/python -m app convert /models/segmenter

# The final stage has no compiler, no pip cache and no source tree: only the venv and models.
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    MODEL_PATH=/models/segmenter \
    MODEL_CACHE_DIR=/var/cache/bigru-serve \
    HOST=0.0.0.0 \
    PORT=8000 \
    GRPC_PORT=8001 \
    FORWARDED_ALLOW_IPS=* \
    TF_CPP_MIN_LOG_LEVEL=2
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --no-create-home --shell /usr/sbin/nologin app
COPY --from=build /opt/venv /opt/venv
COPY models /models
# Writable by the service for other models; read-only (compose, Kubernetes) is fine for a hit.
COPY --from=build --chown=10001:10001 /opt/model-cache /var/cache/bigru-serve
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"]
# uvicorn with --proxy-headers, JSON logs, and a draining shutdown on SIGTERM (app/server.py)
CMD ["python", "-m", "app", "serve"]
