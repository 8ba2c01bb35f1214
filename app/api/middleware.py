"""The request envelope, as plain ASGI middleware (cheaper than Starlette's BaseHTTPMiddleware).

For every HTTP request: a request id (the caller's ``X-Request-ID`` when it is sane, else a
new one) on the response and in the log; the body's limits (:class:`BodyReader`); metrics by
route template and status; and one JSON log line, except for probes and metrics, which
would drown the log.

The body is bounded in size (``413`` before anything parses it) and in time (``408`` when it
has not all arrived ``BODY_TIMEOUT_S`` after the headers). Before any answer to a request
whose body was not read to its end (a 413, an early error), the rest of the body is read and
discarded, up to ``DISCARD_BODY_BYTES`` and the body's deadline: a client that sends its
whole body before reading (urllib, requests, httpx: no ``Expect: 100-continue``) then gets
the answer instead of a connection reset. A client that sent ``Expect: 100-continue`` gets
the 413 before it sends the body, and the connection is closed (as it is past the cap).

At most ``most_requests()`` requests are in flight, probes and scrapes aside: past it a
request gets ``503 overloaded`` with Retry-After at once, its body unread (discarded as above).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import error_response, protocol_error_response
from app.api.streaming import ClientStalled
from app.observability import QUIET_PATHS, Metrics

log = logging.getLogger("app.access")
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class BodyReader:
    """The app's ``receive``: the body, at most ``max_bytes`` of it, all within ``timeout_s``."""

    def __init__(self, scope: Scope, receive: Receive, max_bytes: int, timeout_s: float) -> None:
        self._receive = receive
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.declared = _content_length(scope)
        self.expects_continue = _header(scope, b"expect").lower() == b"100-continue"
        self.received = 0
        self.started = False
        # A request without Content-Length or Transfer-Encoding has no body (RFC 9112 6.3).
        self.complete = self.declared == 0 and not _header(scope, b"transfer-encoding")

    async def receive(self) -> Message:
        if self.complete:  # after the body: waiting for a disconnect, untimed
            return await self._receive()
        if self.declared > self.max_bytes:
            raise BodyTooLarge
        message = await self._next()
        if self.received > self.max_bytes:
            raise BodyTooLarge
        return message

    async def _next(self) -> Message:
        self.started = True
        try:
            async with asyncio.timeout_at(self.deadline):  # no task per chunk, as wait_for makes
                message = await self._receive()
        except TimeoutError:
            raise BodyTimeout from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True  # the client is gone
        return message

    async def discard_rest(self, cap: int) -> bool:
        """Read and drop what is left of the body, up to ``cap`` more bytes and the deadline.
        Returns whether the connection must close (the body was left unread)."""
        if self.complete:
            return False
        if self.expects_continue and not self.started:
            return True  # the client waits for our word before sending: it has the answer now
        if self.declared > self.received + cap:
            return True
        limit = self.received + cap
        while not self.complete:
            if self.received > limit:
                return True
            try:
                await self._next()
            except BodyTimeout:
                return True
        return False


class RequestEnvelope:
    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int,
                 discard_body_bytes: int, body_timeout_s: float, most_requests: Callable[[], int],
                 protocol_prefix: str) -> None:
        self.app = app
        self.protocol_prefix = protocol_prefix  # under it, errors take the Open Inference Protocol's form
        self.most_requests = most_requests
        self.active = 0  # requests in flight, probes and scrapes aside
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.discard_body_bytes = discard_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(value.decode("latin-1") for name, value in scope["headers"]
                                     if name == b"x-request-id")
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())
        status = 500
        started = time.perf_counter()
        response_started = False

        body = BodyReader(scope, receive, self.max_body_bytes, self.body_timeout_s)

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                headers = [*message.get("headers", []), id_header]
                if await body.discard_rest(self.discard_body_bytes):
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        counted = scope["path"] not in QUIET_PATHS
        self.metrics.in_flight.inc()
        self.active += counted
        try:
            if counted and self.active > self.most_requests():
                self.metrics.rejected.labels("too_many_requests").inc()
                refusal = _error(scope, request_id, 503, "overloaded", "too many requests in flight; retry "
                                 "shortly", self.protocol_prefix, {"Retry-After": "1"})
                await refusal(scope, receive, send_with_id)
                return
            await self.app(scope, body.receive, send_with_id)
        except ClientStalled:
            log.warning("client stopped reading the answer: connection closed",
                        extra={"request_id": request_id})  # uvicorn closes it: the answer is incomplete
        except (BodyTooLarge, BodyTimeout) as exc:
            if response_started:
                raise
            status_code, type_, message = (
                (413, "body_too_large", f"the body exceeds {self.max_body_bytes} bytes")
                if isinstance(exc, BodyTooLarge) else
                (408, "body_timeout", f"the body did not arrive within {self.body_timeout_s:g} s"))
            await _error(scope, request_id, status_code, type_, message,
                         self.protocol_prefix)(scope, receive, send_with_id)
        finally:
            self.active -= counted
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
        model, version = scope.get("state", {}).get("model", (None, None))
        log.info("request", extra={
            "request_id": request_id, "method": scope["method"], "path": scope["path"],
            "status": status, "duration_ms": round(seconds * 1000, 3),
            "client": client[0] if client else None, "model": model, "model_version": version,
        })


# Fresh ids: 64 random bits per process, then a count (uuid4 reads the OS's random source per
# request: a system call, under load a visible share of the event loop's time).
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(secrets.randbits(64))


def request_id_from(given: Iterable[str]) -> str:
    """The first sane id the caller gave (HTTP header or gRPC metadata), else a fresh one."""
    for text in given:
        if REQUEST_ID.match(text):
            return text
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


def _error(scope: Scope, request_id: str, status: int, type_: str, message: str, protocol_prefix: str,
           headers: dict[str, str] | None = None) -> ASGIApp:
    """An error in the form of the request's path: the protocol's under its prefix, else ours."""
    if _is_protocol_path(scope["path"], protocol_prefix):
        return protocol_error_response(status, message, headers)
    return error_response(status, type_, message, headers=headers, request_id=request_id)


def _is_protocol_path(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _header(scope: Scope, wanted: bytes) -> bytes:
    for name, value in scope["headers"]:
        if name == wanted:
            return value
    return b""


def _content_length(scope: Scope) -> int:
    try:
        return int(_header(scope, b"content-length") or 0)
    except ValueError:
        return 0
