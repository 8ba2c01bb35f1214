"""Keras 2 ``CuDNNLSTM`` files served as users run them: ``python -m app serve`` with
``MODEL_PATH`` at the ``.h5``, over real HTTP, against tf_keras's own CuDNNLSTM -> LSTM
conversion (the LSTM twin of each model loading the file), alone and batched, up to 600 steps.

- a token model: Embedding -> two stacked Bidirectional CuDNNLSTM layers of different widths
  -> Dense(relu) -> Dense(softmax);
- a feature-vector tagger: CuDNNLSTM -> Bidirectional(CuDNNLSTM, sum) -> TimeDistributed(Dense).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import Server
from tests.helpers import max_diff, tf_keras

MAX_LEN = 600
LENGTHS = [600, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 599]  # the first sets the max
TOLERANCE = 1e-5


def token_model(cell: str) -> Any:
    from tf_keras.src.layers import CuDNNLSTM

    layers = tf_keras().layers
    lstm = CuDNNLSTM if cell == "CuDNNLSTM" else layers.LSTM
    return tf_keras().Sequential([
        layers.InputLayer(input_shape=(None,), name="ids"),
        layers.Embedding(40, 12, name="embedding"),
        layers.Bidirectional(lstm(16, return_sequences=True), name="bi0"),
        layers.Bidirectional(lstm(6, return_sequences=True), name="bi1"),
        layers.Dense(10, activation="relu", name="dense"),
        layers.Dense(4, activation="softmax", name="tags"),
    ])


def feature_model(cell: str) -> Any:
    from tf_keras.src.layers import CuDNNLSTM

    layers = tf_keras().layers
    lstm = CuDNNLSTM if cell == "CuDNNLSTM" else layers.LSTM
    return tf_keras().Sequential([
        layers.InputLayer(input_shape=(None, 7), name="features"),
        lstm(9, return_sequences=True, name="lstm"),
        layers.Bidirectional(lstm(5, return_sequences=True), merge_mode="sum", name="bi"),
        layers.TimeDistributed(layers.Dense(3, activation="softmax"), name="tags"),
    ])


@dataclass
class Served:
    server: Server
    inputs: list[np.ndarray]
    expected: list[np.ndarray]  # tf_keras' outputs, each sequence alone
    hidden: list[np.ndarray]  # tf_keras' last recurrent layer's states


def prepare(build: Any, path: Path, inputs: list[np.ndarray], hidden_layer: str) -> tuple[list, list]:
    """Save the CuDNNLSTM model, then let tf_keras convert it into the LSTM twin, and run the
    twin on each sequence alone (one traced function with a relaxed length: the same numbers as
    eager calls, without stepping 600 steps in Python)."""
    import tensorflow as tf

    model = build("CuDNNLSTM")
    rng = np.random.default_rng(len(inputs))
    model.set_weights([rng.uniform(-0.4, 0.4, w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(path)
    twin = build("LSTM")
    twin.load_weights(path)
    both = tf_keras().Model(twin.inputs, [twin.output, twin.get_layer(hidden_layer).output])
    run = tf.function(lambda x: both(x, training=False), reduce_retracing=True)
    results = [[array.numpy()[0] for array in run(s[None])] for s in inputs]
    return [outputs for outputs, _ in results], [hidden for _, hidden in results]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Served]]:
    directory = tmp_path_factory.mktemp("served-lstm")
    rng = np.random.default_rng(600)
    inputs = {"tokens": [rng.integers(0, 40, n).astype(np.int32) for n in LENGTHS],
              "features": [rng.normal(0, 1, (n, 7)).astype(np.float32) for n in LENGTHS]}
    builds = {"tokens": (token_model, "bi1"), "features": (feature_model, "bi")}
    references = {kind: prepare(build, directory / f"{kind}.h5", inputs[kind], layer)
                  for kind, (build, layer) in builds.items()}
    servers = {kind: Server({"MODEL_PATH": str(directory / f"{kind}.h5"), "MAX_LEN": str(MAX_LEN)},
                            serve=True) for kind in builds}
    try:
        for server in servers.values():
            server.wait_until(timeout=240)
        yield {kind: Served(servers[kind], inputs[kind], *references[kind]) for kind in builds}
    finally:
        for server in servers.values():
            server.stop()


def infer(server: Server, sequences: list[np.ndarray], **extra: object) -> dict:
    response = httpx.post(server.url + "/infer", json={"sequences": [s.tolist() for s in sequences], **extra},
                          timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def arrays(rows: list) -> list[np.ndarray]:
    return [np.asarray(r, np.float32) for r in rows]


@pytest.mark.parametrize("kind", ["tokens", "features"])
def test_infer_matches_tf_kerass_conversion_alone_and_batched(served: dict[str, Served], kind: str) -> None:
    model = served[kind]
    body = infer(model.server, model.inputs, return_hidden=True)
    batched = arrays(body["outputs"])
    assert max_diff(batched, model.expected) <= TOLERANCE
    assert max_diff(arrays(body["hidden"]), model.hidden) <= TOLERANCE
    single = [arrays(infer(model.server, [s])["outputs"])[0] for s in model.inputs]
    assert max_diff(single, model.expected) <= TOLERANCE
    assert max_diff(single, batched) <= 1e-6


def test_model_metadata_says_lstm(served: dict[str, Served]) -> None:
    """``/v1/model`` names the cells; the v2 metadata gives the LSTM stack's hidden width."""
    meta = httpx.get(served["tokens"].server.url + "/v1/model").json()
    assert meta["source"]["conversion"] == "cudnn-lstm->keras-lstm"
    assert [(r["type"], r["units"], r["merge_mode"], r["recurrent_activation"], r["activation"])
            for r in meta["architecture"]["recurrent"]] == [
        ("LSTM", 16, "concat", "sigmoid", "tanh"), ("LSTM", 6, "concat", "sigmoid", "tanh")]
    features = httpx.get(served["features"].server.url + "/v1/model").json()
    assert [(r["type"], r["bidirectional"]) for r in features["architecture"]["recurrent"]] == [
        ("LSTM", False), ("LSTM", True)]
    assert features["input"] == {"kind": "features", "features": 7, "mask_value": None}
    v2 = httpx.get(served["features"].server.url + f"/v2/models/{features['name']}").json()
    shapes = {t["name"]: [int(d) for d in t["shape"]] for t in v2["outputs"]}
    assert shapes["hidden"][-1] == 5 and shapes["outputs"][-1] == 3
