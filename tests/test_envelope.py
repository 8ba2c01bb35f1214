"""The request envelope around the service itself, in process: metrics by the service's route
templates and status, one access-log line per request (none for probes and scrapes), and odd
Content-Length headers. The envelope's own rules (body limits in size and time, draining,
request ids) are tested without a model in ``test_envelope_asgi.py``."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from app.config import Settings
from tests.helpers import TestClient, in_process


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with in_process(Settings(_env_file=None, max_len=64, max_batch=8)) as client:  # type: ignore[call-arg]
        yield client


def sample(client: TestClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


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
