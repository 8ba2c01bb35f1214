"""``python -m app serve``: uvicorn, configured from the settings, with a draining shutdown.

On SIGTERM the service first says 503 on ``/readyz`` for ``DRAIN_DELAY_S`` while it goes on
serving, so that load balancers and Kubernetes endpoints stop sending; then uvicorn stops
accepting (HTTP and gRPC alike), lets in-flight requests (and so every queued job) finish for up
to the rest of ``GRACE_PERIOD_S``, and the process exits. A second SIGTERM, or SIGINT, skips the drain.
Connections use :class:`~app.api.transport.HeaderDeadlineProtocol` (``HEADER_TIMEOUT_S``).
"""

from __future__ import annotations

import asyncio
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_delay_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_delay_s = drain_delay_s
        self.draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self.draining or self.drain_delay_s <= 0:
            super().handle_exit(sig, frame)
            return
        self.draining = True
        repository = getattr(self.app.state, "repository", None)
        if repository is not None:
            repository.drain()
        stop = super().handle_exit
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(loop.call_later, self.drain_delay_s, stop, sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The gRPC server stops accepting together with HTTP, so both drain in the same grace."""
        stop_grpc = getattr(self.app.state, "stop_grpc", None)
        stopping = asyncio.ensure_future(stop_grpc()) if stop_grpc else None
        await super().shutdown(sockets)
        if stopping is not None:
            await stopping


def run() -> None:
    from app.api.transport import HeaderDeadlineProtocol
    from app.config import get_settings
    from app.main import app

    settings = get_settings()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=HeaderDeadlineProtocol,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        access_log=False,
        log_config=None,  # create_app configured logging
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    DrainingServer(config, app, settings.drain_delay_s).run()
