"""The Keras model run by Keras: how a conversion checks the ``.keras`` file it saved.

The saved file is loaded back by Keras (safe mode) and run in graph mode through the
project's :class:`~app.engine.runner.Runner` (length groups, right padding, true lengths),
so the numbers recorded are those of the saved model itself, computed as in serving.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.engine.buckets import length_buckets
from app.engine.runner import Result, Runner
from app.lowering.keras_model import load_keras_model, mask_of
from app.spec import ModelInput, ModelSpec, TokenInput

CHECK_BATCH = 32
PROBE_LENGTHS = (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233)


class KerasGraphEngine:
    """A loaded Keras model behind the runner's engine interface, traced once for every shape
    (graph mode, no XLA): a one-off check of a few dozen sequences compiles nothing per length."""

    name = "keras-graph"
    parallel_calls = False
    ragged = False

    def __init__(self, model: object, model_input: ModelInput) -> None:
        import tensorflow as tf

        self.input = model_input
        step_shape = [] if isinstance(model_input, TokenInput) else [model_input.features]
        shapes = [tf.TensorSpec([None, None, *step_shape], tf.as_dtype(model_input.dtype)),
                  tf.TensorSpec([None, None], tf.bool)]
        self._call = tf.function(lambda inputs, mask: model([inputs, mask], training=False),
                                 input_signature=shapes)

    def run(self, inputs: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs, hidden = self._call(inputs, mask_of(inputs, lengths))
        return outputs.numpy(), hidden.numpy()

    def pad_shape(self, batch: int, steps: int) -> tuple[int, int]:
        return batch, steps

    def warm_shapes(self, max_batch: int, max_len: int) -> list[tuple[int, int]]:
        return []


def run_saved_model(path: Path, model_input: ModelInput, sequences: list[np.ndarray]) -> list[Result]:
    """Each sequence's ``(outputs, hidden)`` from the saved model, as Keras computes them."""
    buckets = length_buckets(max(len(s) for s in sequences))
    return Runner(KerasGraphEngine(load_keras_model(path), model_input), buckets, CHECK_BATCH).run(sequences)


def probe_sequences(spec: ModelSpec) -> list[np.ndarray]:
    """Fixed pseudo-random sequences of lengths 1..233, for models that ship no parity data:
    the serving engine is still checked against the Keras model on them."""
    rng = np.random.default_rng(0)
    return [spec.input.sample(rng, n) for n in PROBE_LENGTHS]
