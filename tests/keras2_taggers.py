"""Keras 2 BiGRU taggers built and saved by tf_keras (Keras 2's own GRU and hard_sigmoid),
with the outputs tf_keras computes for each sequence alone: the authority the service must
reproduce. Also the edits that turn a saved file into what Keras 2.0/2.1 wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tests.helpers import tf_keras

MERGE_STACK = ("concat", "sum", "ave", "mul", None)  # None: a unidirectional GRU


@dataclass(frozen=True)
class Tagger:
    """What to build: every merge mode is one layer of the stack."""

    reset_after: bool
    recurrent_activation: str
    activation: str = "tanh"
    inputs: str = "tokens"  # or "features"
    masking: bool = False
    head: str = "stack"  # "stack": Dense(relu) -> Dropout -> TimeDistributed(Dense) -> Activation
    merges: tuple[str | None, ...] = MERGE_STACK
    vocab: int = 17
    width: int = 5
    units: int = 3

    @property
    def label(self) -> str:
        return (f"reset_after={self.reset_after}-{self.recurrent_activation}/{self.activation}-"
                f"{self.inputs}{'+masking' if self.masking else ''}-{self.head}")


def build(tagger: Tagger, seed: int = 0) -> Any:  # a tf_keras.Sequential
    """The tf_keras model, with random weights (biases too) small enough for any activation."""
    keras2 = tf_keras()
    layers = keras2.layers
    stack = input_layers(tagger)
    for index, merge in enumerate(tagger.merges):
        gru = layers.GRU(tagger.units, return_sequences=True, reset_after=tagger.reset_after,
                         recurrent_activation=tagger.recurrent_activation,
                         activation=tagger.activation, name=f"gru_{index}")
        stack.append(gru if merge is None else
                     layers.Bidirectional(gru, merge_mode=merge, name=f"bigru_{index}"))
    if tagger.head == "stack":
        stack += [layers.Dense(6, activation="relu", name="dense_relu"),
                  layers.Dropout(0.5, name="dropout"),
                  layers.TimeDistributed(layers.Dense(4), name="tags"),
                  layers.Activation("softmax", name="softmax")]
    elif tagger.head == "dense":
        stack.append(layers.Dense(4, activation="sigmoid", name="tags"))
    model = keras2.Sequential(stack)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-0.4, 0.4, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def input_layers(tagger: Any) -> list:
    """Token ids through an Embedding, or feature vectors (through a Masking layer): what a
    tagger (``inputs``, ``vocab``, ``width``, ``masking``) starts with."""
    layers = tf_keras().layers
    if tagger.inputs == "tokens":
        return [layers.InputLayer(input_shape=(None,), name="ids"),
                layers.Embedding(tagger.vocab, tagger.width, name="embedding")]
    stack = [layers.InputLayer(input_shape=(None, tagger.width), name="features")]
    if tagger.masking:
        stack.append(layers.Masking(mask_value=0.0, name="masking"))
    return stack


def sequences(tagger: Tagger, rng: np.random.Generator, max_len: int = 12) -> list[np.ndarray]:
    """One sequence of each length 1..max_len, in a shuffled order."""
    lengths = rng.permutation(np.arange(1, max_len + 1))
    if tagger.inputs == "tokens":
        return [rng.integers(0, tagger.vocab, n).astype(np.int32) for n in lengths]
    return [rng.normal(0, 1, (n, tagger.width)).astype(np.float32) for n in lengths]


def alone(model: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """What tf_keras computes for each sequence on its own (no padding anywhere), through one
    function traced for any length (eager calls cost seconds per model)."""
    import tensorflow as tf

    first = inputs[0]
    call = tf.function(lambda batch: model(batch, training=False), input_signature=[
        tf.TensorSpec((1, None, *first.shape[1:]), tf.as_dtype(first.dtype))])
    return [call(s[None]).numpy()[0] for s in inputs]


def as_keras_2_1(path: Path) -> Path:
    """Rewrite a saved file as Keras <= 2.1 wrote it: no ``reset_after`` key (that Keras had
    only the reset-before form), a Sequential config as a bare list of layers, version 2.0.8."""
    with h5py.File(path, "a") as file:
        config = json.loads(file.attrs["model_config"])

        def strip(node: object) -> None:
            if isinstance(node, dict):
                node.pop("reset_after", None)
                for value in node.values():
                    strip(value)
            elif isinstance(node, list):
                for value in node:
                    strip(value)

        strip(config)
        config["config"] = config["config"]["layers"]
        file.attrs["model_config"] = json.dumps(config).encode()
        file.attrs["keras_version"] = b"2.0.8"
    return path
