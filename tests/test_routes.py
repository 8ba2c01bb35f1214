"""The service's own HTTP routes, in process: what each answers, how an answer is framed (in
one piece, or streamed), the advice of a 413 over the memory budget, a client that stops
reading, and the OpenAPI document for token and feature-vector models."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import orjson
import pytest

from app.api.openapi import limits_description
from app.config import Settings
from app.main import create_app
from app.service.model_service import ModelService
from tests.helpers import TestClient, in_process
from tests.keras2_files import model_config, write_full_model
from tests.reference import random_model

MiB = 2**20


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with in_process(Settings(_env_file=None, max_batch_tokens=256)) as client:  # type: ignore[call-arg]
        yield client


def service_of(client: TestClient) -> ModelService:
    return client.app.state.repository.default()  # type: ignore[attr-defined]


def infer_operation(client: TestClient) -> dict:
    return client.get("/openapi.json").json()["paths"]["/infer"]["post"]


def test_the_read_only_routes_answer_200_with_json(client: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/v1/model", "/v1/model/vocabulary"):
        response = client.get(path)
        assert (response.status_code, response.headers["content-type"]) == (200, "application/json"), path
    assert client.get("/healthz").json() == {"status": "ok"}
    assert len(client.get("/v1/model/vocabulary").json()["tokens"]) == 96


def test_a_model_or_version_not_served_is_a_404_naming_it(client: TestClient) -> None:
    described = client.get("/v1/models/segmenter/versions/1")
    assert described.status_code == 200 and described.json() == client.get("/v1/model").json()
    assert client.get("/v1/models/segmenter").json() == described.json()
    for path, named in (("/v1/models/nope", "nope"), ("/v1/models/segmenter/versions/7", "7")):
        response = client.get(path)
        error = response.json()["error"]
        assert (response.status_code, error["type"]) == (404, "unknown_model"), path
        assert named in error["message"], error


def test_with_several_models_and_no_default_the_default_routes_name_the_others(
    tmp_path: Path, conversion_cache: Path,
) -> None:
    """/v1/model and /infer describe and serve the default model: with two models and no
    DEFAULT_MODEL there is none, and the 400 says which routes to use instead."""
    import shutil

    from tests.conftest import DEFAULT_MODEL

    for name in ("a", "b"):
        shutil.copytree(DEFAULT_MODEL, tmp_path / name / "1")
    settings = Settings(_env_file=None, model_repository=tmp_path)  # type: ignore[call-arg]
    with in_process(settings) as several:
        for response in (several.get("/v1/model"), several.post("/infer", json={"sequences": [[2, 3]]})):
            error = response.json()["error"]
            assert (response.status_code, error["type"]) == (400, "no_default_model")
            assert "/v1/models/a/infer, /v1/models/b/infer" in error["message"], error
        assert several.get("/v1/models/b").json()["name"] == "b"


def test_a_model_with_no_version_loaded_is_described_as_a_503_saying_why(
    tmp_path: Path, conversion_cache: Path,
) -> None:
    """A model whose only version its policy leaves out has nothing to describe: not ready,
    retry later, and the reason in the message; the server's probe says so too."""
    import json
    import shutil

    from tests.conftest import DEFAULT_MODEL

    for name in ("a", "b"):
        shutil.copytree(DEFAULT_MODEL, tmp_path / name / "1")
    (tmp_path / "b" / "config.json").write_text(json.dumps({"version_policy": "specific:5"}))
    settings = Settings(_env_file=None, model_repository=tmp_path, default_model="a")  # type: ignore[call-arg]
    with in_process(settings, ready=False) as client:
        assert client.get("/readyz").json()["error"] == ("model 'b' not ready (failed: version 1: "
                                                         "not chosen by the version policy (specific:5))")
        assert client.get("/v1/models").json()["models"] == [
            {"name": "a", "versions": [{"version": 1, "state": "READY"}]},
            {"name": "b", "versions": [{"version": 1, "state": "UNAVAILABLE",
                                        "reason": "not chosen by the version policy (specific:5)"}]}]
        assert client.get("/v1/models/a").json()["name"] == "a"
        response = client.get("/v1/models/b")
        error = response.json()["error"]
        assert (response.status_code, error["type"]) == (503, "not_ready")
        assert response.headers["retry-after"] == "1"
        assert error["message"] == ("model 'b' not ready (failed: version 1: not chosen by the "
                                    "version policy (specific:5))"), error


def test_an_answer_names_the_served_model(client: TestClient) -> None:
    name = client.get("/v1/model").json()["name"]
    assert client.post("/infer", json={"sequences": [[3, 4]]}).json()["model"] == name == "segmenter"


def test_a_small_answer_goes_in_one_piece_others_are_streamed(client: TestClient) -> None:
    """One engine call without hidden states: one body with its length; several calls (here
    engine calls hold 256 padded tokens), or hidden states: streamed as computed."""
    one_part = {"sequences": [[5] * 100, [6] * 50]}
    whole = client.post("/infer", json=one_part)
    assert whole.headers["content-length"] == str(len(whole.content))
    for body in ({"sequences": [[5] * 100, [6] * 50], "return_hidden": True},
                 {"sequences": [[5] * 200, [6] * 200]}):
        streamed = client.post("/infer", json=body)
        assert streamed.status_code == 200 and "content-length" not in streamed.headers
        assert len(streamed.json()["outputs"]) == 2
    apart = client.post("/infer", json={"sequences": [[5] * 100, [6] * 50], "return_hidden": True}).json()
    assert apart["outputs"] == whole.json()["outputs"]


def test_an_overflowing_number_is_a_422_naming_its_place(client: TestClient) -> None:
    response = client.post("/infer", content=b'{"sequences": [[1, 1e999]]}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("sequences.0.1: ")


def test_broken_json_is_a_400_quoting_the_parser(client: TestClient) -> None:
    error = client.post("/infer", content=b'{"sequences": [[1, 2]',
                        headers={"content-type": "application/json"}).json()["error"]
    assert error["type"] == "invalid_json"
    assert error["message"].startswith("the body is not valid JSON: ") and "line 1 column" in error["message"]


# -- the memory budget's advice ------------------------------------------------------------------

def test_over_the_budget_the_advice_says_what_would_fit() -> None:
    with in_process(Settings(_env_file=None, memory_budget_bytes=16 * MiB)) as client:  # type: ignore[call-arg]
        service = service_of(client)
        costs, budget = service.costs, service.budget
        assert costs is not None and budget is not None

        def body(lengths: list[int], hidden: bool) -> bytes:
            return orjson.dumps({"sequences": [[5] * n for n in lengths], "return_hidden": hidden})

        def fits(lengths: list[int], hidden: bool) -> bool:
            cost = costs.price(lengths, costs.kept_outputs(hidden), len(body(lengths, hidden)))
            return cost.total <= budget.total

        def error(lengths: list[int], hidden: bool) -> dict:
            response = client.post("/infer", content=body(lengths, hidden),
                                   headers={"content-type": "application/json"})
            assert response.status_code == 413, response.text
            return response.json()["error"]

        # the hidden states' rows are what tips it over
        lighter = next(lengths for n in range(16) for last in range(1, 2049, 7)
                       if not fits(lengths := [2048] * n + [last], True) and fits(lengths, False))
        tokens = sum(lengths)
        message = error(lighter, True)["message"]
        assert f"({len(lighter)} sequences, {tokens} tokens, with hidden states)" in message
        assert message.endswith("(fewer or shorter sequences) or drop return_hidden")
        assert client.post("/infer", content=body(lighter, False),
                           headers={"content-type": "application/json"}).status_code == 200

        heavy = [2048] * 8
        assert not fits(heavy, False)
        for hidden in (True, False):
            message = error(heavy, hidden)["message"]
            assert message.endswith("(fewer or shorter sequences)")  # dropping them is not enough
            assert ("with hidden states" in message) == hidden


# -- a client that stops reading ------------------------------------------------------------------

def test_a_client_that_stops_reading_is_cut_after_send_timeout_s() -> None:
    settings = Settings(_env_file=None, send_timeout_s=0.3, max_batch_tokens=64)  # type: ignore[call-arg]
    with in_process(settings) as client:
        body = orjson.dumps({"sequences": [[5] * 60] * 8})
        chunks: list[dict] = []

        async def stalled_client() -> None:
            request = [{"type": "http.request", "body": body}]

            async def receive() -> dict:
                if request:
                    return request.pop(0)
                await anyio.sleep_forever()
                raise AssertionError

            async def send(message: dict) -> None:
                chunks.append(message)
                if message["type"] == "http.response.body":
                    await anyio.sleep_forever()  # takes the first chunk, then nothing

            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/infer", "raw_path": b"/infer", "query_string": b"",
                     "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80),
                     "headers": [(b"content-type", b"application/json"),
                                 (b"content-length", str(len(body)).encode())], "state": {}}
            with anyio.fail_after(10):
                await client.app(scope, receive, send)  # type: ignore[arg-type]

        started = time.monotonic()
        client.portal.call(stalled_client)  # type: ignore[union-attr]
        assert 0.3 <= time.monotonic() - started < 5
        assert chunks[0]["status"] == 200 and len(chunks) == 2  # the start, one chunk: then cut
        used = service_of(client).metrics.registry.get_sample_value("bigru_memory_budget_used_bytes")
        assert used == 0  # the request's memory is released
        assert client.post("/infer", json={"sequences": [[5, 6]]}).status_code == 200


# -- the OpenAPI document -------------------------------------------------------------------------

def test_the_openapi_text_states_this_deployments_limits() -> None:
    with in_process(Settings(_env_file=None, max_len=300, memory_budget_bytes=32 * MiB)) as client:  # type: ignore[call-arg]
        limits = client.get("/v1/model").json()["limits"]
        description = infer_operation(client)["description"]
    assert description == limits_description(limits)
    assert "1..300 tokens" in description and f"the budget of {32 * MiB} bytes" in description


LIMITS = {"max_batch": 64, "max_len": 2048, "max_body_bytes": 4194304, "header_timeout_s": 5.0,
          "body_timeout_s": 10.0, "request_timeout_s": 10.0}
BUDGET = {"memory_budget_bytes": 1000, "largest_request_cost_bytes": 900,
          "memory_budget_from": "MEMORY_BUDGET_BYTES"}
COMMON = ("Limits of this deployment: 1..64 sequences of 1..2048 tokens; bodies up to 4194304 bytes "
          "(else 413 `body_too_large`); headers within 5 s and the body within 10 s (else 408). Each "
          "request is priced in memory before its body is read (the body and what parsing it holds; "
          "a body with more values than the largest request gets 413 `too_many_values` unparsed) and "
          "again before it runs (its tokens, and the output rows in flight, hidden states included "
          "with `return_hidden`)")
STREAMED = (". Large answers are streamed (chunked) as they are computed; with `return_hidden`, "
            "`hidden` comes before `outputs` in the document.")


@pytest.mark.parametrize(("limits", "expected"), [
    (LIMITS, COMMON + STREAMED),  # before the budget is sized
    (LIMITS | BUDGET, COMMON + ": one that needs more than 900 bytes gets 413 `over_memory_budget` (split "
     "it into smaller requests, or drop `return_hidden`); while the budget of 1000 bytes "
     "(MEMORY_BUDGET_BYTES) is taken, requests wait up to 10 s, else 503 `overloaded` with Retry-After"
     + STREAMED),
])
def test_the_limits_in_words(limits: dict, expected: str) -> None:
    assert limits_description(limits) == expected


def test_the_openapi_document_needs_no_loaded_model() -> None:
    """As exported by tools that never start the app: the generic token schema."""
    schema = create_app(Settings(_env_file=None)).openapi()  # type: ignore[call-arg]
    infer = schema["paths"]["/infer"]["post"]
    assert "description" not in infer
    body = infer["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["sequences"]["items"]["maxItems"] == 2048


def test_the_token_models_schema_says_ids(client: TestClient) -> None:
    schema = infer_operation(client)["requestBody"]["content"]["application/json"]["schema"]
    assert schema["description"] == "sequences of token ids: integers in [0, 96)"
    sequences = schema["properties"]["sequences"]
    assert (sequences["minItems"], sequences["maxItems"]) == (1, 64)
    assert (sequences["items"]["minItems"], sequences["items"]["maxItems"]) == (1, 2048)
    step = sequences["items"]["items"]
    assert (step["minimum"], step["maximum"]) == (0, 95)


@pytest.fixture(scope="module")
def feature_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five features per step, behind a Masking layer (mask value 0.5)."""
    model = random_model(np.random.default_rng(3), vocab=None, width=5, units=4, layers=1)
    config = model_config(model)
    config["config"]["layers"].insert(1, {"class_name": "Masking",
                                          "config": {"name": "masking", "mask_value": 0.5}})
    return write_full_model(tmp_path_factory.mktemp("features") / "features.h5", model, config=config)


def test_a_feature_models_schema_and_answers_say_vectors(feature_model: Path) -> None:
    with in_process(Settings(_env_file=None, model_path=feature_model)) as client:  # type: ignore[call-arg]
        schema = infer_operation(client)["requestBody"]["content"]["application/json"]["schema"]
        assert schema["description"] == "sequences of steps, each a vector of 5 numbers, not all equal to 0.5"
        step = schema["properties"]["sequences"]["items"]["items"]
        assert step["minItems"] == step["maxItems"] == 5 and "minimum" not in step
        answer = client.post("/infer", json={"sequences": [[[0.25] * 5] * 3, [[-1.0] * 5]]})
        assert answer.status_code == 200, answer.text
        assert [len(o) for o in answer.json()["outputs"]] == [3, 1]
        assert client.post("/infer", json={"sequences": [[3, 4]]}).status_code == 422
        assert client.post("/infer", json={"sequences": [[[0.5] * 5]]}).status_code == 422  # padding


def test_a_body_is_priced_before_it_is_read_and_refused_past_the_budget() -> None:
    """A 4 MiB budget (3.5 MiB for one request): a 1 MiB body may hold 1 + 12 MiB once parsed
    (a token body holds at most 64 x 2048 ids), refused by its Content-Length, and a body of
    unknown length as it grows past it; a small body is answered and the budget is whole
    again after each."""
    settings = Settings(_env_file=None, memory_budget_bytes=4 * MiB)  # type: ignore[call-arg]
    with in_process(settings) as client:
        spread = b"{" + b" " * 2**20 + b'"sequences": [[5, 6]]}'
        declared = client.post("/infer", content=spread, headers={"Content-Type": "application/json"})
        assert declared.status_code == 413 and declared.json()["error"]["type"] == "over_memory_budget"
        assert "reading and parsing this body" in declared.json()["error"]["message"]
        chunks = (spread[i:i + 65536] for i in range(0, len(spread), 65536))
        growing = client.post("/infer", content=chunks, headers={"Content-Type": "application/json"})
        assert growing.status_code == 413 and "this body" in growing.json()["error"]["message"]
        assert client.post("/infer", json={"sequences": [[5, 6, 7]]}).status_code == 200
        assert service_of(client).budget.used == 0  # type: ignore[union-attr]
