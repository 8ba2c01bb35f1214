"""The runner's engine calls: sequences grouped by length bucket (so padding stays small),
at most ``MAX_BATCH_SIZE`` per call, as few calls as that allows, every shape warmed."""

from __future__ import annotations

import numpy as np
import pytest

from app.engine.buckets import bucket_of, length_buckets
from app.engine.engines import OnnxRuntimeEngine
from app.engine.runner import Runner
from app.spec import ModelSpec
from tests.helpers import GatedEngine, spec_of
from tests.reference import NativeModel, random_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[NativeModel, ModelSpec]:
    native = random_model(np.random.default_rng(17), vocab=20, width=4, units=3, layers=1)
    return native, spec_of(native, tmp_path_factory.mktemp("runner"))


def recording_runner(spec: ModelSpec, max_len: int, max_batch_size: int) -> tuple[Runner, GatedEngine]:
    engine = GatedEngine(OnnxRuntimeEngine(spec, threads=1))
    return Runner(engine, length_buckets(max_len), max_batch_size), engine  # type: ignore[arg-type]


def test_calls_group_one_bucket_each_and_respect_the_batch_size(model: tuple[NativeModel, ModelSpec]) -> None:
    native, spec = model
    runner, engine = recording_runner(spec, max_len=64, max_batch_size=3)
    rng = np.random.default_rng(0)
    lengths = [30, 3, 7, 40, 5, 1, 33, 8, 2, 64, 6, 4, 31]  # bucket 8: 8 of them; 32: 2; 48: 2; 64: 1
    sequences = [rng.integers(0, 20, n).astype(np.int32) for n in lengths]
    results = runner.run(sequences)
    for sequence, (outputs, _) in zip(sequences, results):
        np.testing.assert_allclose(outputs, native.outputs(sequence), rtol=0, atol=1e-5)
    buckets = length_buckets(64)
    for call, (batch, steps) in zip(engine.calls, engine.shapes):
        assert len(call) == batch <= 3
        assert len({bucket_of(buckets, len(s)) for s in call}) == 1  # one bucket per call
        assert steps == max(len(s) for s in call)  # padded to the longest, no further
    assert len(engine.calls) == 3 + 1 + 1 + 1  # ceil(8 / 3) + 1 + 1 + 1: no call wasted


def test_a_max_len_of_one(model: tuple[NativeModel, ModelSpec]) -> None:
    native, spec = model
    runner, engine = recording_runner(spec, max_len=1, max_batch_size=4)
    sequences = [np.array([i], np.int32) for i in range(6)]
    for sequence, (outputs, _) in zip(sequences, runner.run(sequences)):
        np.testing.assert_allclose(outputs, native.outputs(sequence), rtol=0, atol=1e-5)
    assert engine.shapes == [(4, 1), (2, 1)]


def test_buckets_go_on_past_max_len_for_longer_self_check_data() -> None:
    """Past the last bucket the series goes on (a compiling engine compiles a few shapes for
    parity data longer than MAX_LEN, not one per length); within it, the buckets as served."""
    assert length_buckets(2048)[:8] == [8, 12, 16, 24, 32, 48, 64, 96] and length_buckets(2048)[-1] == 2048
    assert length_buckets(100)[-2:] == [96, 100] and length_buckets(1) == [1]
    buckets = length_buckets(8)
    assert [bucket_of(buckets, n) for n in (1, 8, 9, 12, 13, 17, 25, 255, 256, 257)] == \
        [8, 8, 12, 12, 16, 24, 32, 256, 256, 384]


def test_warm_up_runs_every_shape_the_engine_asks_for(model: tuple[NativeModel, ModelSpec]) -> None:
    _, spec = model
    runner, engine = recording_runner(spec, max_len=256, max_batch_size=8)
    expected = engine.warm_shapes(8, 256)
    assert runner.warm_up() == len(expected) == 3
    assert engine.shapes == expected
    assert [[len(s) for s in call] for call in engine.calls] == [[steps] * batch for batch, steps in expected]


def test_calls_hold_at_most_max_batch_tokens_padded_tokens(model: tuple[NativeModel, ModelSpec]) -> None:
    """MAX_BATCH_TOKENS bounds each call's padded tokens (sequences x bucket), exactly at the
    bound; a sequence longer than the bound still runs, alone."""
    native, spec = model
    engine = GatedEngine(OnnxRuntimeEngine(spec, threads=1))
    runner = Runner(engine, length_buckets(64), 8, max_batch_tokens=24)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    lengths = [8, 7, 8, 6, 8, 40, 44]  # bucket 8: five (24 tokens = 3 of them); bucket 48: two
    sequences = [rng.integers(0, 20, n).astype(np.int32) for n in lengths]
    for sequence, (outputs, _) in zip(sequences, runner.run(sequences)):
        np.testing.assert_allclose(outputs, native.outputs(sequence), rtol=0, atol=1e-5)
    assert [len(call) for call in engine.calls] == [3, 2, 1, 1]
    unbounded = GatedEngine(OnnxRuntimeEngine(spec, threads=1))
    Runner(unbounded, length_buckets(64), 8).run(sequences)  # type: ignore[arg-type]
    assert [len(call) for call in unbounded.calls] == [5, 2]


def test_a_ragged_engine_takes_any_lengths_in_one_call_within_the_bounds(
        model: tuple[NativeModel, ModelSpec]) -> None:
    """The native engine computes no padding: sequences of every bucket share a call, up to
    MAX_BATCH_SIZE sequences and MAX_BATCH_TOKENS padded tokens (sequences x the longest)."""
    from app.engine.native_engine import NativeEngine

    native, spec = model
    engine = GatedEngine(NativeEngine(spec, threads=1))
    assert engine.ragged
    runner = Runner(engine, length_buckets(64), 4, max_batch_tokens=120)  # type: ignore[arg-type]
    rng = np.random.default_rng(2)
    lengths = [3, 60, 9, 17, 1, 30, 33, 5, 61, 2]  # shortest first: 1 2 3 5 | 9 17 30 | 33 60 | 61
    sequences = [rng.integers(0, 20, n).astype(np.int32) for n in lengths]
    for sequence, (outputs, _) in zip(sequences, runner.run(sequences)):
        np.testing.assert_allclose(outputs, native.outputs(sequence), rtol=0, atol=1e-5)
    calls = [sorted(len(s) for s in call) for call in engine.calls]
    assert calls == [[1, 2, 3, 5], [9, 17, 30], [33, 60], [61]]
    assert engine.shapes == [(4, 5), (3, 30), (2, 60), (1, 61)]  # padded to the call's longest
