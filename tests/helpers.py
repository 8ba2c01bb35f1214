"""Run a spec through the project's own runner with any engine."""

from __future__ import annotations

from functools import cache

import numpy as np

from app.runtime.buckets import length_buckets
from app.runtime.engines import make_engine
from app.runtime.runner import Runner
from app.spec import ModelSpec

ENGINES = ("onnxruntime", "openvino", "keras")


def runner_for(spec: ModelSpec, engine: str, max_len: int = 64, max_batch_size: int = 8,
               buckets: list[int] | None = None) -> Runner:
    """``buckets``: the length buckets (default: the service's for ``max_len``); one bucket
    keeps the keras engine to one compiled length."""
    buckets = buckets or length_buckets(max_len)
    return Runner(make_engine(engine, spec, threads=2, length_buckets=buckets), buckets, max_batch_size)


def outputs(spec: ModelSpec, sequences: list, engine: str) -> list[np.ndarray]:
    """Per sequence (ids, or feature vectors per step), the model's per-step outputs."""
    runner = runner_for(spec, engine)
    return [o for o, _ in runner.run([np.asarray(s, spec.input.dtype) for s in sequences])]


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
