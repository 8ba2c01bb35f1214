"""The request envelope, in process: request ids, metrics by route template and status, one
access-log line per request (none for probes and scrapes), and odd Content-Length headers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from app.config import Settings
from tests.helpers import TestClient, in_process


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with in_process(Settings(_env_file=None, max_len=64, max_batch=8)) as client:  # type: ignore[call-arg]
        yield client


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_log() -> Iterator[list[logging.LogRecord]]:
    handler = Records()
    logger = logging.getLogger("app.access")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


def sample(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize(("given", "kept"), [
    ("trace-42", True),
    ("a.b:c_d-e", True),
    ("x" * 128, True),
    ("x" * 129, False),
    ("a\tb", False),
    ("", False),
])
def test_sane_request_ids_are_kept_others_replaced(client: TestClient, given: str, kept: bool) -> None:
    response = client.get("/healthz", headers={"X-Request-ID": given})
    returned = response.headers["x-request-id"]
    if kept:
        assert returned == given
    else:
        assert returned != given and len(returned) == 32 and int(returned, 16) >= 0


def test_a_request_without_an_id_gets_a_fresh_one_each_time(client: TestClient) -> None:
    first, second = (client.get("/healthz").headers["x-request-id"] for _ in range(2))
    assert first != second and len(first) == len(second) == 32


def test_metrics_count_by_route_template_method_and_status(client: TestClient) -> None:
    ok = 'bigru_http_requests_total{method="POST",route="/infer",status="200"}'
    bad = 'bigru_http_requests_total{method="POST",route="/infer",status="422"}'
    missing = 'bigru_http_requests_total{method="GET",route="unmatched",status="404"}'
    before = {name: sample(client, name) for name in (ok, bad, missing)}
    client.post("/infer", json={"sequences": [[3, 4]]})
    client.post("/infer", json={"sequences": [[3, 400]]})
    client.get("/no/such/route")
    after = {name: sample(client, name) for name in (ok, bad, missing)}
    assert {name: after[name] - before[name] for name in after} == {ok: 1, bad: 1, missing: 1}
    count = sample(client, 'bigru_http_request_duration_seconds_count{route="/infer"}')
    seconds = sample(client, 'bigru_http_request_duration_seconds_sum{route="/infer"}')
    assert count >= 2 and 0 < seconds < count * 10
    assert sample(client, "bigru_http_requests_in_flight") == 1  # only the scrape itself


def test_one_access_line_per_request_none_for_probes(client: TestClient,
                                                     access_log: list[logging.LogRecord]) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        client.get(path)
    client.post("/infer", json={"sequences": [[9]]}, headers={"X-Request-ID": "logged-1"})
    client.get("/v1/model", headers={"X-Request-ID": "logged-2"})
    lines = [(r.request_id, r.method, r.path, r.status) for r in access_log]  # type: ignore[attr-defined]
    assert lines == [("logged-1", "POST", "/infer", 200), ("logged-2", "GET", "/v1/model", 200)]
    record = access_log[0]
    assert record.getMessage() == "request"
    assert isinstance(record.duration_ms, float) and 0 < record.duration_ms < 10_000  # type: ignore[attr-defined]
    assert record.client == "testclient"  # type: ignore[attr-defined]


@pytest.mark.parametrize("length", ["abc", "-1", ""])
def test_a_garbled_content_length_is_not_a_crash(client: TestClient, length: str) -> None:
    response = client.post("/infer", content=b'{"sequences": [[1]]}',
                           headers={"content-type": "application/json", "content-length": length})
    assert response.status_code < 500


def call_asgi(client: TestClient, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> int:
    """POST /infer straight through the app's ASGI interface, the body in separate messages
    (as a server hands a chunked upload over); returns the status. (Bodies here never reach
    the batcher, which lives on the test client's event loop.)"""
    async def run() -> int:
        pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                   for i, c in enumerate(chunks)]
        sent: list[dict] = []

        async def receive() -> dict:
            return pending.pop(0) if pending else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/infer", "raw_path": b"/infer", "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"), *headers],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80), "state": {}}
        await client.app(scope, receive, send)  # type: ignore[arg-type]
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    return asyncio.run(run())


def test_the_body_limit_adds_up_every_chunk() -> None:
    with in_process(Settings(_env_file=None, max_body_bytes=1024)) as client:  # type: ignore[call-arg]
        body = b'{"sequences": [[999]]}'  # read whole, then refused: 422
        chunked = [(b"transfer-encoding", b"chunked")]  # how a server hands over a chunked upload
        assert call_asgi(client, chunked, [body, b" " * 500, b" " * 502]) == 422  # 1024 bytes in all
        assert call_asgi(client, chunked, [body, b" " * 500, b" " * 503]) == 413  # 1025


def test_a_declared_length_past_the_limit_is_refused_before_reading() -> None:
    with in_process(Settings(_env_file=None, max_body_bytes=1024)) as client:  # type: ignore[call-arg]
        body = b'{"sequences": [[999]]}'
        assert call_asgi(client, [(b"content-length", b"1025")], [body]) == 413
        assert call_asgi(client, [(b"content-length", str(len(body)).encode())], [body]) == 422
