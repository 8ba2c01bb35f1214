"""The default model over real HTTP: GPU parity, batching exactness, hidden states, errors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.conftest import Server
from tests.helpers import max_diff, tf_keras_segmenter
from tests.keras2_taggers import alone as tf_keras_alone

GPU_TOLERANCE = 1e-4


def infer(server: Server, sequences: list[list[int]], **extra) -> dict:
    response = httpx.post(server.url + "/infer", json={"sequences": sequences, **extra}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def as_arrays(rows: list) -> list[np.ndarray]:
    return [np.asarray(r, np.float32) for r in rows]


def test_probes_and_metadata(server: Server) -> None:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").status_code == 200
    meta = httpx.get(server.url + "/v1/model").json()
    assert meta["name"] == "segmenter"
    assert meta["source"]["format"] == "keras2-h5-model"
    assert meta["source"]["conversion"] == "cudnn-gru->keras-gru"
    assert meta["vocab_size"] == 96 and meta["output_width"] == 2
    check = meta["self_check"]
    assert check["passed"] and check["sequences"] == 32
    assert check["max_abs_diff_outputs"] <= GPU_TOLERANCE and check["tolerance"] == GPU_TOLERANCE
    tokens = httpx.get(server.url + "/v1/model/vocabulary").json()["tokens"]
    assert len(tokens) == 96 and tokens[2] == "!"


def test_gpu_parity_batched(server: Server, gpu_reference: dict) -> None:
    sequences = [s.tolist() for s in gpu_reference["ids"]]
    got = as_arrays(infer(server, sequences)["outputs"])
    assert [len(g) for g in got] == [len(s) for s in sequences]
    assert max_diff(got, gpu_reference["probs_fp32"]) <= GPU_TOLERANCE


def test_gpu_parity_one_at_a_time_equals_batched(server: Server, gpu_reference: dict) -> None:
    sequences = [s.tolist() for s in gpu_reference["ids"]]
    batched = as_arrays(infer(server, sequences)["outputs"])
    single = [as_arrays(infer(server, [s])["outputs"])[0] for s in sequences]
    assert max_diff(single, gpu_reference["probs_fp32"]) <= GPU_TOLERANCE
    assert max_diff(single, batched) <= 1e-6


def test_hidden_states_match_the_gpu(server: Server, gpu_reference: dict) -> None:
    sequences = [s.tolist() for s in gpu_reference["ids"][:8]]
    body = infer(server, sequences, return_hidden=True)
    assert max_diff(as_arrays(body["hidden"]), gpu_reference["hidden_fp32"][:8]) <= GPU_TOLERANCE
    assert "hidden" not in infer(server, sequences[:1])


def test_zero_padding_without_lengths_is_detected_as_wrong(server: Server, gpu_reference: dict) -> None:
    """What a naive client does (pad to the longest, no lengths) is what an unmasked GPU
    model returns, and the parity check rejects it: the check can see that mistake."""
    sequences = gpu_reference["ids"]
    longest = max(len(s) for s in sequences)
    padded = [np.pad(s, (0, longest - len(s))).tolist() for s in sequences]
    rows = as_arrays(infer(server, padded)["outputs"])
    cut = [r[: len(s)] for r, s in zip(rows, sequences)]
    assert max_diff(cut, gpu_reference["probs_padded_nomask"]) <= GPU_TOLERANCE
    assert max_diff(cut, gpu_reference["probs_fp32"]) > 0.1


def test_concurrent_mixed_length_requests_equal_sequential(server: Server) -> None:
    rng = np.random.default_rng(0)
    requests = [[rng.integers(2, 96, rng.integers(1, 300)).tolist() for _ in range(rng.integers(1, 4))]
                for _ in range(48)]
    sequential = [as_arrays(infer(server, r)["outputs"]) for r in requests]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda r: as_arrays(infer(server, r)["outputs"]), requests))
    for one, other in zip(sequential, concurrent):
        assert max_diff(one, other) <= 1e-6


def test_max_len_sequences_match_tf_keras_alone_and_batched(server: Server) -> None:
    """Up to MAX_LEN (2048) tokens, past anything the GPU data covers: the service against
    tf_keras running the same weights through its own converter."""
    rng = np.random.default_rng(2048)
    sequences = [rng.integers(2, 96, n).tolist() for n in (2048, 1500, 1025, 1)]
    reference = tf_keras_segmenter()
    expected = tf_keras_alone(reference, [np.asarray(s, np.int32) for s in sequences])
    alone = [as_arrays(infer(server, [s])["outputs"])[0] for s in sequences]
    assert max_diff(alone, expected) <= GPU_TOLERANCE
    batched = as_arrays(infer(server, sequences[::-1])["outputs"])[::-1]
    assert max_diff(batched, alone) <= 1e-6


def test_identical_shapes_sent_at_once_each_get_their_own_answer(server: Server) -> None:
    rng = np.random.default_rng(1)
    requests = [[rng.integers(2, 96, 50).tolist()] for _ in range(32)]
    sequential = [as_arrays(infer(server, r)["outputs"]) for r in requests]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda r: as_arrays(infer(server, r)["outputs"]), requests))
    for one, other in zip(sequential, concurrent):
        assert max_diff(one, other) <= 1e-6


def test_longest_and_shortest_sequences(server: Server) -> None:
    body = infer(server, [[5], list(range(2, 96)) * 21 + [2] * 74])
    assert [len(o) for o in body["outputs"]] == [1, 2048]
    rows = np.asarray(body["outputs"][1])
    np.testing.assert_allclose(rows.sum(axis=1), 1, atol=1e-5)  # softmax rows


BAD_REQUESTS = [
    ("not json", b"{sequences: [[1]]", 400, "invalid_json"),
    ("truncated json", b'{"sequences": [[1, 2', 400, "invalid_json"),
    ("empty body", b"", 400, "invalid_json"),
    ("NaN literal", b'{"sequences": [[NaN]]}', 422, "invalid_token"),
    ("Infinity literal", b'{"sequences": [[1, -Infinity]]}', 422, "invalid_token"),
    ("NaN and broken json", b'{"sequences": [[NaN]]', 400, "invalid_json"),
    ("invalid utf-8", b'{"sequences": [[1]], "x": "\xff"}', 400, "invalid_json"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("not an object", b"[[1, 2]]", 422, "invalid_request"),
    ("missing field", b"{}", 422, "invalid_request"),
    ("unknown field", b'{"sequences": [[1]], "extra": 1}', 422, "invalid_request"),
    ("no sequences", b'{"sequences": []}', 422, "invalid_request"),
    ("empty sequence", b'{"sequences": [[]]}', 422, "invalid_request"),
    ("string token", b'{"sequences": [["a"]]}', 422, "invalid_request"),
    ("float token", b'{"sequences": [[1.5]]}', 422, "invalid_token"),
    ("bool token", b'{"sequences": [[true]]}', 422, "invalid_request"),
    ("nested too deep", b'{"sequences": [[[1]]]}', 422, "invalid_request"),
    ("flat list", b'{"sequences": [1, 2]}', 422, "invalid_request"),
    ("negative id", b'{"sequences": [[1, -1]]}', 422, "invalid_token"),
    ("id past vocab", b'{"sequences": [[1, 96]]}', 422, "invalid_token"),
    ("huge id", b'{"sequences": [[1, 123456789012345678901234567890]]}', 422, "invalid_token"),
    ("id past int64", b'{"sequences": [[1, 9223372036854775808]]}', 422, "invalid_token"),
    ("too many sequences", b'{"sequences": [' + b",".join([b"[1]"] * 65) + b"]}", 422, "invalid_request"),
    ("too long", b'{"sequences": [[' + b",".join([b"1"] * 2049) + b"]]}", 422, "invalid_request"),
    ("hidden flag not bool", b'{"sequences": [[1]], "return_hidden": "yes"}', 422, "invalid_request"),
]


@pytest.mark.parametrize(("case", "body", "status", "kind"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_json_4xx(server: Server, case: str, body: bytes, status: int, kind: str) -> None:
    response = httpx.post(server.url + "/infer", content=body,
                          headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == kind and error["status"] == status and error["message"]


def test_errors_say_where(server: Server) -> None:
    response = httpx.post(server.url + "/infer", json={"sequences": [[1, 2], [3, 400]]})
    assert response.json()["error"]["message"] == "sequences.1.1: token id 400 is not an integer in [0, 96)"
    response = httpx.post(server.url + "/infer", json={"sequences": [[1, "x"]]})
    assert response.json()["error"]["details"][0]["loc"] == ["sequences", 0, 1]
    response = httpx.post(server.url + "/infer", content=b'{"sequences": [[1, 2], [3, NaN]]}')
    assert response.json()["error"]["message"] == "sequences.1.1: token id nan is not an integer in [0, 96)"


def test_integral_floats_are_integers(server: Server) -> None:
    """JSON Schema's "integer" includes 2.0; the schema says integer, so 2.0 is accepted."""
    assert infer(server, [[2.0, 3, 40.0]]) == infer(server, [[2, 3, 40]])


def test_mask_zero_models_refuse_the_padding_id(tmp_path) -> None:
    """A model with Embedding(mask_zero=True) treats id 0 as padding to skip; requests are
    unpadded, so id 0 is refused rather than computed differently from the trained model."""
    from tests.keras2_files import model_config, write_full_model
    from tests.reference import random_model

    model = random_model(np.random.default_rng(0), vocab=10, width=5, units=3, layers=1)
    config = model_config(model)
    config["config"]["layers"][1]["config"]["mask_zero"] = True
    path = write_full_model(tmp_path / "masked.h5", model, config=config)
    server = Server({"MODEL_PATH": str(path)})
    try:
        server.wait_until()
        refused = httpx.post(server.url + "/infer", json={"sequences": [[3, 0, 4]]})
        assert refused.status_code == 422
        message = refused.json()["error"]["message"]
        assert message == "sequences.0.1: token id 0 is not an integer in [1, 10)"
        body = infer(server, [[3, 9, 4]])
        assert max_diff(as_arrays(body["outputs"]), [model.outputs(np.array([3, 9, 4]))]) < 1e-5
        token = httpx.get(server.url + "/openapi.json").json()["paths"]["/infer"]["post"]["requestBody"]
        schema = token["content"]["application/json"]["schema"]["properties"]["sequences"]["items"]["items"]
        assert (schema["minimum"], schema["maximum"]) == (1, 9)
    finally:
        server.stop()


def test_unknown_route_and_method_are_json(server: Server) -> None:
    missing = httpx.get(server.url + "/nope")
    assert missing.status_code == 404 and missing.json()["error"]["status"] == 404
    wrong = httpx.get(server.url + "/infer")
    assert wrong.status_code == 405 and wrong.json()["error"]["status"] == 405


def test_service_still_serves_after_bad_input(server: Server) -> None:
    for _, body, _, _ in BAD_REQUESTS:
        httpx.post(server.url + "/infer", content=body, timeout=30)
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert len(infer(server, [[2, 3, 4]])["outputs"][0]) == 3
