"""The request envelope on its own, driven through ASGI as a server drives it: body limits
in size and time, what is drained before an early answer and when the connection must close,
request ids, metrics and the access log. No model is loaded, so these run in milliseconds
(``make mutation`` runs them once per mutant of ``app/api/middleware.py``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.kserve import PREFIX as PROTOCOL_PREFIX
from app.api.middleware import BodyTooLarge, RequestEnvelope
from app.api.streaming import ClientStalled
from app.observability import Metrics

LIMIT = 1024
CAP = 4096  # DISCARD_BODY_BYTES


async def read_all(request: Request) -> Response:
    body = await request.body()
    return JSONResponse({"bytes": len(body), "request_id": request.state.request_id})


async def answer_early(request: Request) -> Response:
    return JSONResponse({"refused": True}, status_code=422)


async def read_one_chunk(request: Request) -> Response:
    async for _ in request.stream():
        break
    return JSONResponse({"read": "one chunk"}, status_code=422)


async def in_flight(request: Request) -> Response:
    gauge = request.scope["metrics"].registry.get_sample_value("bigru_http_requests_in_flight")
    return JSONResponse({"in_flight": gauge})


async def stall(request: Request) -> Response:
    raise ClientStalled


# The bare router: as in the service, nothing between the envelope and the routes answers
# an exception for them (Starlette's own app would send a 500 first).
inner = Router(routes=[
    Route("/infer", read_all, methods=["POST"]),
    Route("/early", answer_early, methods=["POST"]),
    Route("/first", read_one_chunk, methods=["POST"]),
    Route("/v2/models/{name}/infer", read_all, methods=["POST"]),
    Route("/v2", read_all, methods=["POST"]),
    Route("/v2x", read_all, methods=["POST"]),
    Route("/healthz", in_flight),
    Route("/stall", stall),
])


@dataclass
class Exchange:
    """One request through the envelope: what the app was sent and what the client got."""
    sent: list[Message] = field(default_factory=list)
    reads: int = 0  # the server's receive() calls

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    @property
    def headers(self) -> dict[bytes, bytes]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return dict(start["headers"])

    @property
    def json(self) -> dict:
        return json.loads(b"".join(m["body"] for m in self.sent if m["type"] == "http.response.body"))


class Envelope:
    """The envelope around ``app`` (the routes above unless told), as the service sets it."""

    def __init__(self, metrics: Metrics, timeout_s: float = 5.0, app: ASGIApp = inner,
                 most_requests: int = 100) -> None:
        self.metrics = metrics
        self.envelope = RequestEnvelope(app, metrics, max_body_bytes=LIMIT, discard_body_bytes=CAP,
                                        body_timeout_s=timeout_s, most_requests=lambda: most_requests,
                                        protocol_prefix=PROTOCOL_PREFIX)

    def request(self, path: str, chunks: list[bytes] | None = None, headers: dict[str, str] | None = None,
                method: str = "POST", scope: dict | None = None, stuck: bool = False,
                disconnect_after: int | None = None, interval: float = 0.0) -> Exchange:
        """``chunks``: the body's messages (the last without ``more_body``); ``stuck``: after
        them the client sends nothing more; ``disconnect_after``: the client leaves after
        that many of them; ``interval``: each arrives that long after the one before."""
        return asyncio.run(self._request(path, chunks or [], headers or {}, method, scope or {},
                                         stuck, disconnect_after, interval))

    async def _request(self, path: str, chunks: list[bytes], headers: dict[str, str], method: str,
                       extra: dict, stuck: bool, disconnect_after: int | None, interval: float) -> Exchange:
        exchange = Exchange()
        messages: list[Message] = [{"type": "http.request", "body": chunk, "more_body": True}
                                   for chunk in chunks]
        if messages and not stuck:
            del messages[-1]["more_body"]  # the last: ASGI's default for a missing flag is False
        if disconnect_after is not None:
            messages = [*messages[:disconnect_after], {"type": "http.disconnect"}]

        async def receive() -> Message:
            exchange.reads += 1
            if messages:
                await asyncio.sleep(interval)
                return messages.pop(0)
            if stuck:
                await asyncio.Event().wait()  # a client that went quiet mid-body
            await asyncio.sleep(0.05)  # after the body: the disconnect comes later
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            exchange.sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
                 "root_path": "", "client": ("10.0.0.7", 5000), "server": ("127.0.0.1", 80),
                 "metrics": self.metrics,
                 "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()],
                 "state": {}, **extra}
        if "state" in extra and extra["state"] is None:
            del scope["state"]  # a server without lifespan state
        await self.envelope(scope, receive, send)
        return exchange

    def count(self, route: str, method: str, status: int) -> float:
        labels = {"route": route, "method": method, "status": str(status)}
        return self.metrics.registry.get_sample_value("bigru_http_requests_total", labels) or 0.0


@pytest.fixture
def envelope() -> Envelope:
    return Envelope(Metrics())


def sized(n: int) -> dict[str, str]:
    return {"content-length": str(n)}


# -- the body's size -------------------------------------------------------------------------

def test_a_body_at_the_limit_is_read_whole(envelope: Envelope) -> None:
    exchange = envelope.request("/infer", [b"a" * 1000, b"b" * 24], sized(LIMIT))
    assert (exchange.status, exchange.json["bytes"], exchange.reads) == (200, LIMIT, 2)
    assert b"connection" not in exchange.headers


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_one_byte_past_the_limit_is_413_with_a_json_error(envelope: Envelope, declared: bool) -> None:
    headers = sized(LIMIT + 1) if declared else {"transfer-encoding": "chunked"}
    exchange = envelope.request("/infer", [b"a" * 1000, b"b" * 25], headers | {"x-request-id": "big-1"})
    assert exchange.status == 413 and exchange.headers[b"content-type"] == b"application/json"
    assert exchange.json == {"error": {"status": 413, "type": "body_too_large",
                                       "message": f"the body exceeds {LIMIT} bytes", "request_id": "big-1"}}
    assert exchange.reads == 2  # the rest is drained so that the client reads the answer
    assert b"connection" not in exchange.headers
    assert envelope.count("/infer", "POST", 413) == 1


def test_a_declared_length_past_the_limit_is_refused_before_reading(envelope: Envelope) -> None:
    exchange = envelope.request("/infer", [b"a" * 2000], sized(2000))
    assert exchange.status == 413 and exchange.reads == 1  # one read: the drain, after the answer


def test_a_declared_body_within_the_drain_cap_is_drained(envelope: Envelope) -> None:
    exchange = envelope.request("/early", [b"a" * 1000] * 4 + [b"a" * 96], sized(CAP))
    assert (exchange.status, exchange.reads) == (422, 5)
    assert b"connection" not in exchange.headers


def test_a_declared_body_past_the_drain_cap_is_not_read_and_the_connection_closes(envelope: Envelope) -> None:
    exchange = envelope.request("/infer", [b"a" * 1000] * 5, sized(LIMIT + CAP + 1))
    assert (exchange.status, exchange.reads) == (413, 0)
    assert exchange.headers[b"connection"] == b"close"


def test_an_undeclared_body_is_drained_up_to_the_cap_then_the_connection_closes(envelope: Envelope) -> None:
    chunked = {"transfer-encoding": "chunked"}
    # 2000 bytes read when refused; the cap is checked before each read, so 5000 more are read
    exchange = envelope.request("/infer", [b"a" * 1000] * 7, chunked)
    assert exchange.status == 413 and exchange.reads == 7
    assert b"connection" not in exchange.headers
    exchange = envelope.request("/infer", [b"a" * 1000] * 8, chunked)
    assert exchange.status == 413 and exchange.reads == 7  # 7000 read: past 2000 + the cap
    assert exchange.headers[b"connection"] == b"close"
    exchange = envelope.request("/early", [b"a" * 2048] * 2 + [b"a"] * 2, chunked)
    assert exchange.reads == 3  # exactly the cap read, and more to come: one read more
    assert exchange.headers[b"connection"] == b"close"


def test_over_limit_under_v2_answers_in_the_protocols_form(envelope: Envelope) -> None:
    for path in ("/v2/models/m/infer", "/v2"):
        exchange = envelope.request(path, [b"a" * 2000], sized(2000))
        assert exchange.status == 413 and exchange.json == {"error": f"the body exceeds {LIMIT} bytes"}
    exchange = envelope.request("/v2x", [b"a" * 2000], sized(2000))
    assert exchange.json["error"]["type"] == "body_too_large"  # only the /v2 tree is the protocol's


@pytest.mark.parametrize("length", ["abc", "-1", ""])
def test_a_garbled_content_length_is_taken_as_none(envelope: Envelope, length: str) -> None:
    exchange = envelope.request("/infer", [b"abc"], {"content-length": length})
    assert (exchange.status, exchange.json["bytes"]) == (200, 3)
    if not length.lstrip("-").isdigit():  # not a number: no body to drain
        assert envelope.request("/early", [b"abc"], {"content-length": length}).reads == 0


def test_the_limit_counts_what_arrives_not_what_was_declared(envelope: Envelope) -> None:
    exchange = envelope.request("/infer", [b"a" * 1000, b"b" * 25], sized(10))
    assert exchange.status == 413


def test_a_limit_hit_after_the_answer_started_is_the_apps_problem(envelope: Envelope) -> None:
    async def answers_then_reads(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        while (await receive()).get("more_body"):
            pass

    raw = Envelope(envelope.metrics, app=answers_then_reads)
    with pytest.raises(BodyTooLarge):
        raw.request("/raw", [b"a" * 1000] * 6, sized(LIMIT + CAP + 1))  # too big to drain
    assert raw.count("unmatched", "POST", 200) == 1


# -- what is drained before an early answer ---------------------------------------------------

def test_an_unread_body_is_drained_before_an_early_answer(envelope: Envelope) -> None:
    exchange = envelope.request("/early", [b"x" * 100, b"y" * 100], sized(200))
    assert (exchange.status, exchange.reads) == (422, 2)
    assert b"connection" not in exchange.headers


def test_a_one_byte_body_counts_as_a_body(envelope: Envelope) -> None:
    exchange = envelope.request("/early", [b"x"], sized(1))
    assert exchange.reads == 1


def test_a_request_without_length_or_chunks_has_no_body_to_drain(envelope: Envelope) -> None:
    exchange = envelope.request("/early", [b"x"], {})
    assert (exchange.status, exchange.reads) == (422, 0)
    assert envelope.request("/early", [b"x"], {"transfer-encoding": "chunked"}).reads == 1


def test_a_client_waiting_for_100_continue_is_answered_and_the_connection_closed(envelope: Envelope) -> None:
    exchange = envelope.request("/early", [b"x" * 100], sized(100) | {"expect": "100-Continue"})
    assert (exchange.status, exchange.reads) == (422, 0)
    assert exchange.headers[b"connection"] == b"close"


def test_a_100_continue_body_once_started_is_drained(envelope: Envelope) -> None:
    exchange = envelope.request("/first", [b"x" * 100, b"y" * 100], sized(200) | {"expect": "100-continue"})
    assert (exchange.status, exchange.reads) == (422, 2)
    assert b"connection" not in exchange.headers


def test_a_client_that_left_mid_body_is_not_waited_for(envelope: Envelope) -> None:
    exchange = envelope.request("/first", [b"x" * 100, b"y" * 100, b"z" * 100], sized(300),
                                disconnect_after=1)
    assert (exchange.status, exchange.reads) == (422, 2)  # the chunk, then the disconnect: done
    assert b"connection" not in exchange.headers


# -- the body's time ---------------------------------------------------------------------------

def test_a_body_that_stops_arriving_gets_408_and_a_closed_connection() -> None:
    envelope = Envelope(Metrics(), timeout_s=0.2)
    started = time.monotonic()
    exchange = envelope.request("/infer", [b"a" * 10], sized(100) | {"x-request-id": "slow-1"}, stuck=True)
    assert 0.2 <= time.monotonic() - started < 2
    assert exchange.status == 408 and exchange.headers[b"connection"] == b"close"
    assert exchange.json == {"error": {"status": 408, "type": "body_timeout",
                                       "message": "the body did not arrive within 0.2 s",
                                       "request_id": "slow-1"}}
    exchange = envelope.request("/v2/models/m/infer", [b"a"], sized(100), stuck=True)
    assert exchange.json == {"error": "the body did not arrive within 0.2 s"}


def test_the_deadline_counts_from_the_headers_not_from_each_chunk() -> None:
    envelope = Envelope(Metrics(), timeout_s=0.3)
    assert envelope.request("/infer", [b"a"] * 2, sized(2), interval=0.1).status == 200
    assert envelope.request("/infer", [b"a"] * 6, sized(6), interval=0.1).status == 408  # each chunk in time


def test_after_the_body_waiting_for_the_disconnect_is_not_timed() -> None:
    envelope = Envelope(Metrics(), timeout_s=0.01)

    async def waits_for_disconnect(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # the body
        assert (await receive())["type"] == "http.disconnect"  # 50 ms later: past the deadline
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    envelope.envelope.app = waits_for_disconnect
    assert envelope.request("/raw", [b"abc"], sized(3)).status == 204
    assert envelope.request("/raw", [], {}, method="GET").status == 204


# -- request ids, metrics, log --------------------------------------------------------------------

@pytest.mark.parametrize(("given", "kept"), [
    ("trace-42", True), ("a.b:c_d-e", True), ("x" * 128, True),
    ("x" * 129, False), ("a\tb", False), ("", False), ("caf\u00e9", False),
])
def test_sane_request_ids_are_kept_others_replaced(envelope: Envelope, given: str, kept: bool) -> None:
    exchange = envelope.request("/infer", [b"{}"], sized(2) | {"x-request-id": given})
    returned = exchange.headers[b"x-request-id"].decode()
    assert exchange.json["request_id"] == returned  # the app sees the id the client gets
    if kept:
        assert returned == given
    else:
        assert returned != given and len(returned) == 32 and int(returned, 16) >= 0


def test_the_request_id_reaches_the_app_without_server_state(envelope: Envelope) -> None:
    exchange = envelope.request("/infer", [b"{}"], sized(2) | {"x-request-id": "no-state"},
                                scope={"state": None})
    assert exchange.json["request_id"] == "no-state"


def test_metrics_count_by_route_template_method_and_status(envelope: Envelope) -> None:
    envelope.request("/v2/models/a/infer", [b"{}"], sized(2))
    envelope.request("/v2/models/b/infer", [b"{}"], sized(2))
    envelope.request("/early", [b"{}"], sized(2))
    envelope.request("/nowhere", [], {}, method="GET")
    assert envelope.count("/v2/models/{name}/infer", "POST", 200) == 2
    assert envelope.count("/early", "POST", 422) == 1
    assert envelope.count("unmatched", "GET", 404) == 1
    registry = envelope.metrics.registry
    assert registry.get_sample_value("bigru_http_request_duration_seconds_count",
                                     {"route": "/v2/models/{name}/infer"}) == 2
    assert 0 < registry.get_sample_value("bigru_http_request_duration_seconds_sum",
                                         {"route": "/early"}) < 5


def test_the_id_is_added_to_an_answer_without_headers(envelope: Envelope) -> None:
    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204})  # ASGI: headers are optional
        await send({"type": "http.response.body", "body": b""})

    exchange = Envelope(envelope.metrics, app=bare).request("/raw", headers={"x-request-id": "bare-1"})
    assert exchange.headers == {b"x-request-id": b"bare-1"}


def test_in_flight_counts_the_request_being_answered(envelope: Envelope) -> None:
    assert envelope.request("/healthz", method="GET").json == {"in_flight": 1.0}
    assert envelope.metrics.registry.get_sample_value("bigru_http_requests_in_flight") == 0


def test_an_app_failure_counts_as_500_and_still_propagates(envelope: Envelope) -> None:
    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("bug")

    raw = Envelope(envelope.metrics, app=fails)
    with pytest.raises(RuntimeError):
        raw.request("/raw", method="GET")
    assert raw.count("unmatched", "GET", 500) == 1
    assert envelope.metrics.registry.get_sample_value("bigru_http_requests_in_flight") == 0


def test_one_access_line_per_request_none_for_probes(envelope: Envelope,
                                                     access_log: list[logging.LogRecord]) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"):
        envelope.request(path, method="GET")
    envelope.request("/infer", [b"{}"], sized(2) | {"x-request-id": "logged-1"})
    envelope.request("/early", [b"{}"], sized(2) | {"x-request-id": "logged-2"}, scope={"client": None})
    lines = [(r.request_id, r.method, r.path, r.status, r.client)  # type: ignore[attr-defined]
             for r in access_log]
    assert lines == [("logged-1", "POST", "/infer", 200, "10.0.0.7"),
                     ("logged-2", "POST", "/early", 422, None)]
    record = access_log[0]
    assert record.getMessage() == "request" and record.levelno == logging.INFO
    assert isinstance(record.duration_ms, float) and 0 < record.duration_ms < 5_000  # type: ignore[attr-defined]
    assert record.duration_ms == round(record.duration_ms, 3)  # type: ignore[attr-defined]


def test_a_client_that_stopped_reading_is_logged_and_not_raised(envelope: Envelope,
                                                                access_log: list[logging.LogRecord]) -> None:
    envelope.request("/stall", method="GET", headers={"x-request-id": "stalled-1"})
    (warning,) = [r for r in access_log if r.levelno == logging.WARNING]
    assert warning.getMessage() == "client stopped reading the answer: connection closed"
    assert warning.request_id == "stalled-1"  # type: ignore[attr-defined]


def test_non_http_scopes_pass_through_untouched(envelope: Envelope) -> None:
    seen: list[tuple] = []

    async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    raw = Envelope(envelope.metrics, app=lifespan_app)
    asyncio.run(raw.envelope({"type": "lifespan"}, receive, send))
    assert seen == [({"type": "lifespan"}, receive, send)]
    assert envelope.metrics.registry.get_sample_value("bigru_http_requests_in_flight") == 0


def test_past_the_request_cap_a_fast_503_probes_aside() -> None:
    """Requests past MAX_REQUESTS get 503 overloaded with Retry-After (the protocol's form
    under /v2), their bodies drained; probes and scrapes are never counted nor refused."""
    metrics = Metrics()
    full = Envelope(metrics, most_requests=0)
    refused = full.request("/infer", [b"x" * 100, b"y" * 100], {"Content-Length": "200"})
    assert refused.status == 503 and refused.headers[b"retry-after"] == b"1"
    assert refused.json["error"]["type"] == "overloaded"
    assert b"connection" not in refused.headers  # the body was drained: the connection stays usable
    assert full.request("/v2/models/m/infer", [b"{}"]).json == {
        "error": "too many requests in flight; retry shortly"}
    assert full.request("/healthz", method="GET").status == 200
    assert metrics.registry.get_sample_value("bigru_rejected_requests_total",
                                             {"reason": "too_many_requests"}) == 2
    one = Envelope(Metrics(), most_requests=1)  # the count goes down again after each request
    assert [one.request("/infer", [b"{}"]).status for _ in range(3)] == [200, 200, 200]
