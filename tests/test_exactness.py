"""Every length from 1 to MAX_LEN, alone and batched, against the NumPy GRU written from
cuDNN's equations (an independent reference), through the project's own runner and both
engines: what a client sending a 2048-token sequence relies on."""

from __future__ import annotations

import numpy as np
import pytest

from app.spec import ModelSpec
from tests.helpers import ENGINES, max_diff, runner_for, spec_of
from tests.reference import NativeModel, random_model

MAX_LEN = 2048  # the documented default of MAX_LEN
# Both ends of every bucket edge that matters: 1, the first bucket (8), the middle (1024)
# and the end, where a runner that mishandles long lengths shows.
LENGTHS = (1, 2, 8, 9, 100, 1023, 1024, 1025, 1537, 2047, 2048)
KERAS_LENGTHS = (1, 9, 1023, 1025, 2047, 2048)  # XLA compiles per shape: fewer shapes
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[NativeModel, ModelSpec]:
    """Two bidirectional CuDNNGRU layers, input width != units, written as a Keras 2 file."""
    model = random_model(np.random.default_rng(2048), vocab=40, width=6, units=5, layers=2)
    return model, spec_of(model, tmp_path_factory.mktemp("long"))


@pytest.fixture(scope="module")
def sequences_and_reference(long_model: tuple[NativeModel, ModelSpec]) -> dict[int, tuple]:
    model, _ = long_model
    rng = np.random.default_rng(7)
    table = {}
    for length in LENGTHS:
        ids = rng.integers(0, 40, length).astype(np.int32)
        table[length] = (ids, model.outputs(ids), model.hidden(ids))
    return table


@pytest.mark.parametrize("engine", ENGINES)
def test_every_length_up_to_max_len_alone_and_batched(
    engine: str, long_model: tuple[NativeModel, ModelSpec], sequences_and_reference: dict[int, tuple],
) -> None:
    _, spec = long_model
    lengths = LENGTHS if engine == "onnxruntime" else KERAS_LENGTHS
    runner = runner_for(spec, engine, max_len=MAX_LEN, max_batch_size=8)
    ids = [sequences_and_reference[n][0] for n in lengths]
    expected_outputs = [sequences_and_reference[n][1] for n in lengths]
    expected_hidden = [sequences_and_reference[n][2] for n in lengths]

    alone = [runner.run([s])[0] for s in ids]
    assert max_diff([o for o, _ in alone], expected_outputs) < TOLERANCE
    assert max_diff([h for _, h in alone], expected_hidden) < TOLERANCE

    order = np.random.default_rng(1).permutation(len(ids))  # not sorted by length
    batched = runner.run([ids[i] for i in order])
    for position, index in enumerate(order):
        np.testing.assert_allclose(batched[position][0], alone[index][0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(batched[position][1], alone[index][1], rtol=0, atol=1e-6)


def test_equal_lengths_in_one_batch_keep_their_order(long_model: tuple[NativeModel, ModelSpec]) -> None:
    """Sequences of identical shape are indistinguishable to the engine: each must still get
    its own rows back, in request order."""
    _, spec = long_model
    runner = runner_for(spec, "onnxruntime", max_len=MAX_LEN, max_batch_size=8)
    rng = np.random.default_rng(3)
    ids = [rng.integers(0, 40, 37).astype(np.int32) for _ in range(5)]
    alone = [runner.run([s])[0][0] for s in ids]
    batched = [o for o, _ in runner.run(ids)]
    for got, expected in zip(batched, alone):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert max_diff([alone[0]], [alone[1]]) > 1e-3  # the sequences really differ


def test_batches_larger_than_an_engine_call_are_split_and_reassembled(
    long_model: tuple[NativeModel, ModelSpec],
) -> None:
    model, spec = long_model
    runner = runner_for(spec, "onnxruntime", max_len=64, max_batch_size=3)
    rng = np.random.default_rng(5)
    ids = [rng.integers(0, 40, n).astype(np.int32) for n in (5, 5, 5, 5, 5, 5, 5, 40, 3, 64)]
    got = runner.run(ids)
    assert max_diff([o for o, _ in got], [model.outputs(s) for s in ids]) < TOLERANCE
