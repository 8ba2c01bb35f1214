"""The ASGI application: ``uvicorn app.main:app``, or ``python -m app serve`` (which adds the
draining shutdown of :mod:`app.server`). The server listens at once; the models are converted,
loaded and checked in the background while ``/readyz`` reports the stage."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api.dataplane import most_requests
from app.api.docs import include_docs
from app.api.errors import install_error_handlers
from app.api.kserve import PREFIX as PROTOCOL_PREFIX
from app.api.kserve.admin import AdminGate
from app.api.kserve.grpc_service import GrpcServer, start_grpc_server
from app.api.kserve.repository import build_repository_router
from app.api.kserve.rest import include_kserve_routes
from app.api.middleware import RequestEnvelope
from app.api.plain_routes import PlainDispatch
from app.api.routes import include_routes
from app.config import Settings, get_settings
from app.errors import ConfigurationError, ModelError
from app.observability import Metrics, configure_logging
from app.service.repository import Repository
from app.system import return_freed_memory

log = logging.getLogger("app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return_freed_memory()
    metrics = Metrics()
    gate = AdminGate.from_settings(settings)  # the token is read here, once

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        repository = Repository(settings, metrics)
        app.state.repository = repository
        grpc_server = await _start_grpc(repository, settings, gate)
        grace = settings.shutdown_grace_s
        # New calls refused, calls in flight finish within the grace. app.server stops it as soon
        # as HTTP stops accepting; plain uvicorn here, once HTTP has finished.
        app.state.stop_grpc = (lambda: grpc_server.stop(grace)) if grpc_server else None
        starting = asyncio.create_task(_start(repository, settings))
        yield
        starting.cancel()
        if grpc_server is not None:
            await grpc_server.stop(grace)
        await repository.close()
        log.info("stopped")

    app = FastAPI(
        title="BiGRU inference",
        version=__version__,
        description="Per-step outputs of a cuDNN-trained (bidirectional) GRU or LSTM model, served on CPU.",
        root_path=settings.root_path,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.metrics = metrics
    install_error_handlers(app)
    plain = include_routes(app, settings)
    include_docs(app)
    plain += include_kserve_routes(app, settings)
    app.include_router(build_repository_router(gate))
    # Inside the envelope (added last, so outermost): the inference routes skip FastAPI's machinery.
    app.add_middleware(PlainDispatch, plain=plain)
    app.add_middleware(RequestEnvelope, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       discard_body_bytes=settings.discard_body_bytes, body_timeout_s=settings.body_timeout_s,
                       most_requests=lambda: most_requests(getattr(app.state, "repository", None),
                                                           settings.max_requests),
                       protocol_prefix=PROTOCOL_PREFIX)
    return app


async def _start_grpc(repository: Repository, settings: Settings, gate: AdminGate) -> GrpcServer | None:
    """The Open Inference Protocol's gRPC service on GRPC_PORT (0: none)."""
    if not settings.grpc_port:
        return None
    try:
        server = await start_grpc_server(repository, settings, gate)
    except RuntimeError as exc:
        log.error("cannot serve gRPC on %s:%d: %s", settings.host, settings.grpc_port, exc)
        raise
    log.info("gRPC (Open Inference Protocol) on %s:%d", settings.host, settings.grpc_port)
    return server


async def _start(repository: Repository, settings: Settings) -> None:
    """Load the models (while /readyz reports the stage), then serve.

    ``MODEL_PATH`` that can't be converted or read ends the process, as a failed start-up does
    (exit 3, uvicorn's own code for it), with one line naming the file and the problem; with
    ``EXIT_ON_FAILURE`` any version that fails does (exit 1)."""
    try:
        failed = await repository.start()
    except (ModelError, FileNotFoundError) as exc:
        log.error("cannot serve %s: %s", settings.model_repository, exc)
        _exit(3)
    if settings.model_repository is None and any(instance.unreadable for instance in failed):
        _exit(3)  # the version logged what it cannot serve
    gc.freeze()  # start-up's objects live for good: no collection need walk them (a walk blocks the loop)
    if failed and settings.exit_on_failure:
        _exit(1)  # EXIT_ON_FAILURE: let the orchestrator restart or report us


def _exit(code: int) -> None:
    logging.shutdown()
    os._exit(code)


try:
    app = create_app()
except ConfigurationError as exc:  # one line naming the settings, not a traceback; exit 2
    log.error("cannot start: %s", exc)
    logging.shutdown()
    raise SystemExit(2) from None
