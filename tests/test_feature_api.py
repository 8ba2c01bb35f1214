"""A Keras 2 feature-vector tagger (InputLayer (steps, features) -> Masking -> Keras 2's
default GRU -> Dense stack) served from its .h5 as it is, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import Server
from tests.helpers import max_diff
from tests.keras2_taggers import Tagger, alone, build, sequences

Served = tuple[Server, list[np.ndarray], list[np.ndarray]]  # server, inputs, tf_keras' outputs
TAGGER = Tagger(False, "hard_sigmoid", inputs="features", masking=True, width=5,
                merges=("concat", "sum"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    model = build(TAGGER, seed=11)
    path = Path(tmp_path_factory.mktemp("features")) / "tagger.h5"
    model.save(path)
    inputs = sequences(TAGGER, np.random.default_rng(12))
    server = Server({"MODEL_PATH": str(path), "MAX_LEN": "64"})
    server.wait_until()
    yield server, inputs, alone(model, inputs)
    server.stop()


def post(server: Server, body: bytes | dict) -> httpx.Response:
    if isinstance(body, dict):
        return httpx.post(server.url + "/infer", json=body, timeout=30)
    return httpx.post(server.url + "/infer", content=body, timeout=30,
                      headers={"content-type": "application/json"})


def test_serves_keras_2s_numbers_batched_and_alone(served: Served) -> None:
    server, inputs, expected = served
    body = post(server, {"sequences": [s.tolist() for s in inputs], "return_hidden": True}).json()
    batched = [np.asarray(o, np.float32) for o in body["outputs"]]
    assert max_diff(batched, expected) <= 1e-5
    assert [len(h) for h in body["hidden"]] == [len(s) for s in inputs]
    single = [np.asarray(post(server, {"sequences": [s.tolist()]}).json()["outputs"][0], np.float32)
              for s in inputs[:4]]
    assert max_diff(single, batched[:4]) <= 1e-6


def test_model_metadata_and_openapi_say_feature_vectors(served: Served) -> None:
    server, _, _ = served
    meta = httpx.get(server.url + "/v1/model").json()
    assert meta["input"] == {"kind": "features", "features": 5, "mask_value": 0.0}
    assert meta["vocab_size"] is None
    assert {(r["reset_after"], r["recurrent_activation"], r["activation"])
            for r in meta["architecture"]["recurrent"]} == {(False, "hard_sigmoid", "tanh")}
    assert [d["activation"] for d in meta["architecture"]["dense"]] == ["relu", "softmax"]
    schema = httpx.get(server.url + "/openapi.json").json()
    body = schema["paths"]["/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    step = body["properties"]["sequences"]["items"]["items"]
    assert step["type"] == "array" and step["items"]["type"] == "number"
    assert step["minItems"] == step["maxItems"] == 5
    assert body["description"] == "sequences of steps, each a vector of 5 numbers, not all equal to 0"


BAD = [
    ("wrong width", b'{"sequences": [[[1,2,3,4,5]], [[1,2,3,4,5], [1,2,3,4]]]}', "invalid_features",
     "sequences.1.1: 4 features, the model takes 5"),
    ("NaN", b'{"sequences": [[[1,2,3,4,5], [1,2,NaN,4,5]]]}', "invalid_request",
     "sequences.0.1.2: Input should be a finite number"),
    ("Infinity", b'{"sequences": [[[1,2,3,4,-Infinity]]]}', "invalid_request",
     "sequences.0.0.4: Input should be a finite number"),
    ("overflowing number", b'{"sequences": [[[1,2,3,4,1e400]]]}', "invalid_request",
     "sequences.0.0.4: Input should be a finite number"),
    ("past float32", b'{"sequences": [[[1,2,3,4,5]], [[1,2,3,1e39,5]]]}', "invalid_features",
     "sequences.1.0.3: 1e+39 is not a finite float32 number"),
    ("a string", b'{"sequences": [[[1,2,"3",4,5]]]}', "invalid_request",
     "sequences.0.0.2: Input should be a valid number"),
    ("a bool", b'{"sequences": [[[1,2,3,4,true]]]}', "invalid_request",
     "sequences.0.0.4: Input should be a valid number"),
    ("token ids", b'{"sequences": [[1, 2, 3]]}', "invalid_request",
     "sequences.0.0: Input should be a valid list"),
    ("empty step", b'{"sequences": [[[]]]}', "invalid_request",
     "sequences.0.0: List should have at least 1 item after validation, not 0"),
    ("masked step", b'{"sequences": [[[1,2,3,4,5], [0,0,0,0,0.0]]]}', "invalid_features",
     "sequences.0.1: every feature equals the model's Masking value 0, so the model would skip "
     "this step as padding; send sequences unpadded"),
]


@pytest.mark.parametrize(("case", "body", "kind", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_feature_requests_get_a_422_naming_the_place(
        served: Served, case: str, body: bytes, kind: str, message: str) -> None:
    server, _, _ = served
    response = post(server, body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["type"], error["message"].split(" (and")[0]) == (kind, message)


def test_still_ready_after_bad_requests(served: Served) -> None:
    server, inputs, expected = served
    for _, body, _, _ in BAD:
        post(server, body)
    assert httpx.get(server.url + "/readyz").status_code == 200
    got = post(server, {"sequences": [inputs[0].tolist()]}).json()["outputs"]
    assert max_diff([np.asarray(got[0], np.float32)], expected[:1]) <= 1e-5
