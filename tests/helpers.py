"""Run a spec through the project's own runner with any engine, or the whole app in process."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np

with warnings.catch_warnings():  # starlette suggests httpx2, which is not what we pin
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from app.config import Settings
from app.engine.buckets import length_buckets
from app.engine.engines import Engine, make_engine
from app.engine.runner import Runner
from app.spec import ModelSpec
from tests.reference import NativeModel

ENGINES = ("native", "onnxruntime", "openvino", "keras")
VARIANT_ENGINES = ("native", "onnxruntime", "keras")  # every GRU variant (openvino: cuDNN's only)


def runner_for(spec: ModelSpec, engine: str, max_len: int = 64, max_batch_size: int = 8,
               buckets: list[int] | None = None) -> Runner:
    """``buckets``: the length buckets (default: the service's for ``max_len``); one bucket
    keeps the keras engine to one compiled length."""
    buckets = buckets or length_buckets(max_len)
    return Runner(make_engine(engine, spec, threads=2, length_buckets=buckets), buckets, max_batch_size)


def outputs(spec: ModelSpec, sequences: list, engine: str) -> list[np.ndarray]:
    """Per sequence (ids, or feature vectors per step), the model's per-step outputs, all of
    them in one engine call padded to the longest: the keras engine compiles one shape."""
    inputs = [np.asarray(s, spec.input.dtype) for s in sequences]
    runner = runner_for(spec, engine, max_batch_size=len(inputs), buckets=[max(len(s) for s in inputs)])
    return [o for o, _ in runner.run(inputs)]


def max_diff(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == np.shape(e), (g.shape, np.shape(e))
    # np.max, not max(): a NaN anywhere (an overflow on either side) must fail, not hide
    return float(np.max([np.max(np.abs(g - np.asarray(e))) for g, e in zip(got, expected)]))


@cache
def tf_keras():
    import tf_keras as module

    return module


def spec_of(model: NativeModel, directory: Path) -> ModelSpec:
    """The spec the service reads from ``model`` written as a Keras 2 CuDNNGRU file."""
    from app.formats.keras_h5 import read_keras_h5
    from app.formats.manifest import Architecture
    from tests.keras2_files import write_full_model

    return read_keras_h5(write_full_model(directory / "model.h5", model), Architecture(), "model")


@contextmanager
def in_process(settings: Settings, ready: bool = True) -> Iterator[TestClient]:
    """The app of ``create_app(settings)`` in this process (lifespan included), once the
    model is ready (``ready``) or has failed its preparation."""
    from app.main import create_app

    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").json()["stage"] not in ("ready", "failed"):
            assert time.monotonic() < deadline, "the model never became ready"
            time.sleep(0.02)
        if ready:
            assert client.get("/readyz").status_code == 200, client.get("/readyz").text
        yield client


@cache
def tf_keras_segmenter():
    """The default model as tf_keras builds it from the Keras 2 weights-only file of the same
    GPU-trained weights: tf_keras's own CuDNNGRU -> GRU converter, independent of ours."""
    keras2 = tf_keras()
    layers = keras2.layers
    model = keras2.Sequential([
        layers.InputLayer(input_shape=(None,)),
        layers.Embedding(96, 32, name="embedding"),
        *[layers.Bidirectional(layers.GRU(128, return_sequences=True, reset_after=True), name=f"bigru_{i}")
          for i in range(2)],
        layers.TimeDistributed(layers.Dense(2, activation="softmax"), name="tags"),
    ])
    model.load_weights(str(Path(__file__).resolve().parent / "fixtures" / "segmenter_weights.h5"))
    return model


class GatedEngine:
    """The real engine, recording each call's sequences; while ``gate`` is clear, calls wait."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.name, self.parallel_calls, self.input = engine.name, engine.parallel_calls, engine.input
        self.ragged = engine.ragged
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[list[tuple[int, ...]]] = []  # per call: the real sequences it ran
        self.shapes: list[tuple[int, int]] = []  # per call: the padded (batch, steps)
        self.started = 0
        self.threads: list[int] = []  # per call: the thread that ran it
        self.niceness: list[int] = []  # per call: its thread's scheduling niceness

    def run(self, ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.started += 1
        self.threads.append(threading.get_ident())
        self.niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        self.gate.wait(timeout=30)
        self.calls.append([tuple(row[:n]) for row, n in zip(ids.tolist(), lengths.tolist())])
        self.shapes.append(ids.shape)
        return self.engine.run(ids, lengths)

    def pad_shape(self, batch: int, steps: int) -> tuple[int, int]:
        return self.engine.pad_shape(batch, steps)

    def warm_shapes(self, max_batch: int, max_len: int) -> list[tuple[int, int]]:
        return self.engine.warm_shapes(max_batch, max_len)
