"""The inference routes answered in plain ASGI (:mod:`app.api.plain_routes`), in process,
against the same app with the dispatcher taken out (FastAPI answering every route, as
before it): the same status, headers and body for every inference route and its errors,
the same access log records and metrics; every other request still goes to FastAPI, and
the OpenAPI document and /docs are unchanged."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import orjson
import pytest

from app.api.plain_routes import PlainDispatch
from app.config import Settings
from app.main import create_app
from tests.helpers import TestClient, in_process

API = Path(__file__).resolve().parent.parent / "app" / "api"  # the request path's code

TOKENS = {"sequences": [[5, 6, 7], [8, 9]]}
V2 = {"id": "r1", "inputs": [{"name": "ids", "shape": [1, 3], "datatype": "INT32", "data": [5, 6, 7]},
                             {"name": "lengths", "shape": [1], "datatype": "INT32", "data": [3]}]}
# (path, JSON body or raw bytes): answers, and each kind of error the routes give
REQUESTS: list[tuple[str, object]] = [
    ("/infer", TOKENS),
    ("/infer", {"sequences": [[5, 6]], "return_hidden": True}),  # streamed
    ("/v1/models/segmenter/infer", TOKENS),
    ("/v1/models/segmenter/versions/1/infer", TOKENS),
    ("/v1/models/nope/infer", TOKENS),  # 404
    ("/v1/models/segmenter/versions/7/infer", TOKENS),  # 404, no such version
    ("/infer", {"sequences": [[500]]}),  # 422
    ("/infer", {"sequences": []}),  # 422, the schema
    ("/infer", b'{"sequences": [[1, 2]'),  # 400, broken JSON
    ("/infer", b"x" * 5000),  # 413, the envelope's body limit
    ("/v2/models/segmenter/infer", V2),
    ("/v2/models/segmenter/versions/1/infer", V2),
    ("/v2/models/segmenter/infer", {"inputs": [{"name": "ids", "shape": [1, 1], "datatype": "INT32",
                                                "data": [500]}, V2["inputs"][1]]}),  # 422 -> 400
    ("/v2/models/segmenter/infer", {"inputs": []}),  # 400
    ("/v2/models/nope/infer", V2),  # 404
    ("/v2/models/segmenter/infer", b"x" * 5000),  # 413, in the protocol's form
]


def settings() -> Settings:
    # One engine for both apps (``auto`` picks by timing): their outputs are then the same bits.
    return Settings(_env_file=None, max_body_bytes=4096, grpc_port=0,  # type: ignore[call-arg]
                    engine="onnxruntime")


@contextmanager
def fastapi_only() -> Iterator[TestClient]:
    """The app as :func:`create_app` makes it, less the dispatcher: FastAPI answers all."""
    import time

    app = create_app(settings())
    app.user_middleware = [m for m in app.user_middleware if m.cls is not PlainDispatch]
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the model never became ready"
            time.sleep(0.02)
        yield client


@pytest.fixture(scope="module")
def clients() -> Iterator[tuple[TestClient, TestClient]]:
    with in_process(settings()) as plain, fastapi_only() as framework:
        yield plain, framework


def post(client: TestClient, path: str, body: object, request_id: str | None = "req-1") -> object:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"content-type": "application/json", **({"x-request-id": request_id} if request_id else {})}
    return client.post(path, content=content, headers=headers)


def dispatcher_of(client: TestClient) -> PlainDispatch | None:
    layer = client.app.middleware_stack  # type: ignore[attr-defined]
    while layer is not None and not isinstance(layer, PlainDispatch):
        layer = getattr(layer, "app", None)
    return layer


@pytest.mark.parametrize(("path", "body"), REQUESTS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(REQUESTS)])
def test_each_inference_request_answers_as_through_fastapi(clients: tuple[TestClient, TestClient],
                                                           path: str, body: object) -> None:
    plain, framework = clients
    got, expected = post(plain, path, body), post(framework, path, body)
    assert got.status_code == expected.status_code
    assert got.headers.multi_items() == expected.headers.multi_items()
    assert got.content == expected.content
    assert got.headers["x-request-id"] == "req-1"


def test_a_fresh_request_id_is_in_the_header_and_the_error(clients: tuple[TestClient, TestClient]) -> None:
    for client in clients:
        response = post(client, "/v1/models/nope/infer", TOKENS, request_id=None)
        assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
        assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


def test_the_inference_routes_skip_fastapi_the_rest_go_through(clients: tuple[TestClient, TestClient],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    plain, framework = clients
    assert dispatcher_of(framework) is None
    dispatcher = dispatcher_of(plain)
    assert dispatcher is not None
    passed: list[tuple[str, str]] = []
    inner = dispatcher.app

    async def counting(scope: dict, receive: object, send: object) -> None:
        passed.append((scope["method"], scope["path"]))
        await inner(scope, receive, send)  # type: ignore[operator]

    monkeypatch.setattr(dispatcher, "app", counting)
    for path in ("/infer", "/v1/models/segmenter/infer", "/v1/models/segmenter/versions/1/infer",
                 "/v2/models/segmenter/infer", "/v2/models/segmenter/versions/1/infer"):
        post(plain, path, V2 if path.startswith("/v2") else TOKENS)
    assert passed == []
    assert plain.get("/healthz").status_code == 200
    assert plain.get("/infer").status_code == 405  # other methods: FastAPI's answer
    assert plain.post("/v1/models", json={}).status_code == 405
    assert plain.post("/infer/x", json={}).status_code == 404
    assert passed == [("GET", "/healthz"), ("GET", "/infer"), ("POST", "/v1/models"), ("POST", "/infer/x")]


def test_other_methods_and_paths_answer_as_through_fastapi(clients: tuple[TestClient, TestClient]) -> None:
    plain, framework = clients
    for method, path in (("GET", "/infer"), ("PUT", "/v2/models/segmenter/infer"), ("POST", "/infer/"),
                         ("POST", "/v1/models/segmenter"), ("GET", "/v2/models/segmenter"),
                         ("POST", "/v2/models/a/b/infer")):
        got = plain.request(method, path, headers={"x-request-id": "r"}, follow_redirects=False)
        expected = framework.request(method, path, headers={"x-request-id": "r"}, follow_redirects=False)
        assert (got.status_code, got.headers.multi_items(), got.content) == (
            expected.status_code, expected.headers.multi_items(), expected.content), (method, path)


def test_the_openapi_document_and_docs_are_unchanged(clients: tuple[TestClient, TestClient]) -> None:
    plain, framework = clients
    assert plain.get("/openapi.json").json() == framework.get("/openapi.json").json()
    assert plain.get("/docs").text == framework.get("/docs").text


def test_the_same_access_log_records(clients: tuple[TestClient, TestClient],
                                     access_log: list[logging.LogRecord]) -> None:
    fields = ("request_id", "method", "path", "status", "client", "model", "model_version")
    logged = []
    for client in clients:
        access_log.clear()
        for path, body in REQUESTS:
            post(client, path, body)
        logged.append([(r.getMessage(), r.levelno, *(getattr(r, f) for f in fields)) for r in access_log])
        assert all(isinstance(r.duration_ms, float) for r in access_log)  # type: ignore[attr-defined]
    assert logged[0] == logged[1]
    assert len(logged[0]) == len(REQUESTS)


def test_the_same_metrics(clients: tuple[TestClient, TestClient]) -> None:
    """Request counts by route template, method and status, and latency by route, for the
    same requests (the apps are separate, each with its own registry)."""
    def samples(client: TestClient) -> dict[str, float]:
        text = client.get("/metrics").text
        wanted = ("bigru_http_requests_total{", "bigru_http_request_duration_seconds_count{",
                  "bigru_rejected_requests_total{", "bigru_sequence_tokens_count{")
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(wanted) and "/readyz" not in line and "/metrics" not in line
                and "openapi" not in line and "unmatched" not in line}

    before = [samples(client) for client in clients]
    for client in clients:
        for path, body in REQUESTS:
            post(client, path, body)
    after = [samples(client) for client in clients]
    grown = [{name: value - b.get(name, 0) for name, value in a.items() if value != b.get(name, 0)}
             for a, b in zip(after, before)]
    assert grown[0] == grown[1]
    assert 'bigru_http_requests_total{method="POST",route="/v2/models/{name}/versions/{version}/infer",' \
           'status="200"}' in grown[0]


def test_one_app_answers_parameters_and_refusals_and_passes_other_bodies_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On an app of its own (the shared one is built in another test's setup): a route with
    parameters, a refusal in each form, none of them through FastAPI, and a POST FastAPI
    answers reading its body."""
    repository_api = {"repository_api": True, "admin_token": "secret"}
    with in_process(Settings(_env_file=None, grpc_port=0, engine="onnxruntime",  # type: ignore[call-arg]
                             **repository_api)) as client:
        dispatcher, passed = dispatcher_of(client), []
        assert dispatcher is not None
        inner = dispatcher.app

        async def counting(scope: dict, receive: object, send: object) -> None:
            passed.append(scope["path"])
            await inner(scope, receive, send)  # type: ignore[operator]

        monkeypatch.setattr(dispatcher, "app", counting)
        assert post(client, "/infer", TOKENS).status_code == 200
        assert post(client, "/v1/models/segmenter/versions/1/infer", TOKENS).status_code == 200
        assert post(client, "/v2/models/segmenter/versions/1/infer", V2).status_code == 200
        refused = post(client, "/v1/models/nope/infer", TOKENS)
        assert refused.status_code == 404 and refused.json()["error"]["type"] == "unknown_model"
        refused = post(client, "/v2/models/nope/infer", V2)
        assert refused.status_code == 404 and set(refused.json()) == {"error"}
        index = client.post("/v2/repository/index", json={"ready": True},
                            headers={"authorization": "Bearer secret"})
        assert index.status_code == 200 and [m["name"] for m in index.json()] == ["segmenter"]
        assert passed == ["/v2/repository/index"]


def test_a_refusal_lets_go_of_the_requests_frames_at_once(clients: tuple[TestClient, TestClient]) -> None:
    """No frame of a refused request outlives its answer (held in a reference cycle until the
    collector's next pass, a frame keeps the body and its parsed forms, which the memory
    budget no longer counts: near-limit bodies reached a 512 MiB cgroup's limit that way)."""
    import gc
    import sys
    import types

    plain, _ = clients
    gc.collect()
    gc.disable()
    try:
        for path, body in REQUESTS:
            post(plain, path, body)
        running = {id(frame) for top in sys._current_frames().values() for frame in _stack(top)}
        alive = [o.f_code.co_name for o in gc.get_objects() if isinstance(o, types.FrameType)
                 and o.f_code.co_filename.startswith(str(API)) and id(o) not in running]
    finally:
        gc.enable()
    assert alive == [], repr(alive)


def _stack(frame: object) -> Iterator[object]:
    """``frame`` and its callers (a thread's stack, running: not left over)."""
    while frame is not None:
        yield frame
        frame = frame.f_back  # type: ignore[attr-defined]
