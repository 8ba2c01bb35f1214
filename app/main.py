"""The ASGI application: ``uvicorn app.main:app``, or ``python -m app serve`` (which adds the
draining shutdown of :mod:`app.server`). The server listens at once; the model is converted,
loaded and checked in the background while ``/readyz`` reports the stage."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api.docs import include_docs
from app.api.errors import install_error_handlers
from app.api.middleware import RequestEnvelope
from app.api.routes import include_routes
from app.config import Settings, get_settings
from app.errors import ModelError
from app.observability import Metrics, configure_logging
from app.runtime.admission import return_freed_memory
from app.runtime.service import ModelService

log = logging.getLogger("app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    return_freed_memory()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = ModelService(settings, metrics)
        app.state.service = service
        starting = asyncio.create_task(_start(service, settings))
        yield
        starting.cancel()
        await service.close()
        log.info("stopped")

    app = FastAPI(
        title="BiGRU inference",
        version=__version__,
        description="Per-step outputs of a cuDNN-trained (bidirectional) GRU model, served on CPU.",
        root_path=settings.root_path,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.metrics = metrics
    app.add_middleware(RequestEnvelope, metrics=metrics, max_body_bytes=settings.max_body_bytes,
                       discard_body_bytes=settings.discard_body_bytes, body_timeout_s=settings.body_timeout_s)
    install_error_handlers(app)
    include_routes(app, settings)
    include_docs(app)
    return app


async def _start(service: ModelService, settings: Settings) -> None:
    """Convert and load (while /readyz reports the stage), then prepare the engine.

    A model that can't be converted or read ends the process, as a failed start-up does
    (exit 3, uvicorn's own code for it), with one line naming the file and the problem."""
    try:
        await asyncio.to_thread(service.load)
    except ModelError as exc:
        log.error("cannot serve %s: %s", settings.model_path, exc)
        _exit(3)
    await service.prepare()
    if service.status.stage == "failed" and settings.exit_on_failure:
        _exit(1)  # EXIT_ON_FAILURE: let the orchestrator restart or report us


def _exit(code: int) -> None:
    logging.shutdown()
    os._exit(code)


app = create_app()
