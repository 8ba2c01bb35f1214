"""Input validation in process (fast enough to run on every mutant): every bad request of
``test_api`` gets its JSON 4xx, messages point at the first bad token, and ids at both ends
of the vocabulary are accepted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from tests.helpers import TestClient, in_process
from tests.test_api import BAD_REQUESTS


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with in_process(Settings(_env_file=None)) as client:  # type: ignore[call-arg]
        yield client


@pytest.mark.parametrize(("case", "body", "status", "kind"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_json_4xx(client: TestClient, case: str, body: bytes, status: int,
                                     kind: str) -> None:
    response = client.post("/infer", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["status"] == status and error["message"]
    assert error["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(("sequences", "message"), [
    ([[1, 2], [3, 400]], "sequences.1.1: token id 400 is not an integer in [0, 96)"),
    ([[-1]], "sequences.0.0: token id -1 is not an integer in [0, 96)"),
    ([[5, 6, 7], [8], [9, 10, 96.0]], "sequences.2.2: token id 96 is not an integer in [0, 96)"),
    ([[5, 2.5, 7, 1000]], "sequences.0.1: token id 2.5 is not an integer in [0, 96) (and 1 more)"),
    ([[99], [1], [-3, 200]], "sequences.0.0: token id 99 is not an integer in [0, 96) (and 2 more)"),
    ([[1, 2], [400]], "sequences.1.0: token id 400 is not an integer in [0, 96)"),  # first of a row
])
def test_messages_point_at_the_first_bad_token(client: TestClient, sequences: list, message: str) -> None:
    response = client.post("/infer", json={"sequences": sequences})
    assert response.status_code == 422
    assert response.json()["error"] == {"status": 422, "type": "invalid_token", "message": message,
                                        "request_id": response.headers["x-request-id"]}


def test_both_ends_of_the_vocabulary_and_integral_floats_are_served(client: TestClient) -> None:
    body = client.post("/infer", json={"sequences": [[0, 95], [95.0, 0.0], [7]]}).json()
    assert [len(o) for o in body["outputs"]] == [2, 2, 1] and "hidden" not in body
    first = np.asarray(body["outputs"][0])
    np.testing.assert_allclose(first.sum(axis=1), 1, atol=1e-5)  # softmax rows
    with_hidden = client.post("/infer", json={"sequences": [[0, 95]], "return_hidden": True}).json()
    assert np.asarray(with_hidden["hidden"][0]).shape == (2, 256)
    np.testing.assert_allclose(with_hidden["outputs"][0], first, atol=1e-6)


def test_shape_errors_carry_details_with_locations(client: TestClient) -> None:
    error = client.post("/infer", json={"sequences": [[1, "x"]]}).json()["error"]
    assert error["type"] == "invalid_request" and error["details"][0]["loc"] == ["sequences", 0, 1]
    assert "sequences.0.1" in error["message"]


def test_answers_are_json(client: TestClient) -> None:
    for response in (client.post("/infer", json={"sequences": [[1]]}), client.get("/v1/model"),
                     client.get("/readyz"), client.get("/healthz")):
        assert response.headers["content-type"] == "application/json"


def test_openapi_publishes_the_models_token_range_and_error_answers() -> None:
    with in_process(Settings(_env_file=None)) as client:  # type: ignore[call-arg]
        infer = client.get("/openapi.json").json()["paths"]["/infer"]["post"]
    token = infer["requestBody"]["content"]["application/json"]["schema"]["properties"]["sequences"]
    assert (token["items"]["items"]["minimum"], token["items"]["items"]["maximum"]) == (0, 95)
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    errors = {code for code, answer in infer["responses"].items()
              if answer["content"]["application/json"]["schema"] == error}
    assert errors == {"400", "413", "422", "503", "504"}


def test_a_mask_zero_model_publishes_and_enforces_ids_from_one(tmp_path: Path) -> None:
    from tests.keras2_files import model_config, write_full_model
    from tests.reference import random_model

    model = random_model(np.random.default_rng(0), vocab=10, width=5, units=3, layers=1)
    config = model_config(model)
    config["config"]["layers"][1]["config"]["mask_zero"] = True
    path = write_full_model(tmp_path / "masked.h5", model, config=config)
    with in_process(Settings(_env_file=None, model_path=path)) as client:  # type: ignore[call-arg]
        schema = client.get("/openapi.json").json()["paths"]["/infer"]["post"]["requestBody"]
        token = schema["content"]["application/json"]["schema"]["properties"]["sequences"]["items"]["items"]
        assert (token["minimum"], token["maximum"]) == (1, 9)
        refused = client.post("/infer", json={"sequences": [[3, 0]]}).json()["error"]
        assert refused["message"] == "sequences.0.1: token id 0 is not an integer in [1, 10)"
