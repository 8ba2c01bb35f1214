"""The request envelope, as plain ASGI middleware (cheaper than Starlette's BaseHTTPMiddleware).

For every HTTP request: a request id (the caller's ``X-Request-ID`` when it is sane, else a
new one) on the response and in the log; a body-size limit enforced before anything parses
the body (``413``); metrics by route template and status; and one JSON log line, except for
probes and metrics, which would drown the log.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response, protocol_error_response
from app.api.kserve import PREFIX as PROTOCOL_PREFIX
from app.observability import QUIET_PATHS, Metrics

log = logging.getLogger("app.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class BodyTooLarge(Exception):
    pass


class RequestEnvelope:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        status = 500
        started = time.perf_counter()
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise BodyTooLarge
            return message

        self.metrics.in_flight.inc()
        try:
            if _content_length(scope) > self.max_body_bytes:
                raise BodyTooLarge
            await self.app(scope, limited_receive, send_with_id)
        except BodyTooLarge:
            if response_started:
                raise
            message = f"the body exceeds {self.max_body_bytes} bytes"
            response = (protocol_error_response(413, message) if _is_protocol_path(scope["path"])
                        else error_response(413, "body_too_large", message, request_id=request_id))
            await response(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, request_id, status, time.perf_counter() - started)

    def _record(self, scope: Scope, request_id: str, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        self.metrics.requests.labels(template, scope["method"], str(status)).inc()
        self.metrics.latency.labels(template).observe(seconds)
        if scope["path"] in QUIET_PATHS:
            return  # probes and scrapes; the service logs its own state changes
        client = scope.get("client")
        log.info("request", extra={
            "request_id": request_id, "method": scope["method"], "path": scope["path"],
            "status": status, "duration_ms": round(seconds * 1000, 3),
            "client": client[0] if client else None,
        })


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if REQUEST_ID.match(text):
                return text
    return uuid.uuid4().hex


def _is_protocol_path(path: str) -> bool:
    """Under ``/v2``, errors take the Open Inference Protocol's form."""
    return path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/")


def _content_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
