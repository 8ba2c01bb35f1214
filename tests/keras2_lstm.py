"""Keras 2 LSTM taggers built and saved by tf_keras: ``CuDNNLSTM`` (Keras 2 / TF 1.x's cuDNN
layer; tf_keras still builds and saves it on CPU) and ``LSTM`` with any activations. The
authority for a ``CuDNNLSTM`` file is tf_keras's own converter: the same architecture built
with ``LSTM`` (cuDNN's sigmoid / tanh) loading the file, which converts the weights on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.helpers import tf_keras
from tests.keras2_taggers import alone, input_layers

MERGE_STACK = ("concat", "sum", "ave", "mul", None)  # None: a unidirectional layer


@dataclass(frozen=True)
class LSTMTagger:
    """What to build; each layer of the stack has its own merge mode and width."""

    cell: str = "CuDNNLSTM"  # or "LSTM"
    recurrent_activation: str = "sigmoid"  # an LSTM's; a CuDNNLSTM is always sigmoid / tanh
    activation: str = "tanh"
    inputs: str = "tokens"  # or "features"
    merges: tuple[str | None, ...] = MERGE_STACK
    units: tuple[int, ...] = (4, 3, 5, 2, 3)
    head: str = "stack"  # Dense(relu) -> Dense(softmax); "dense": one Dense(sigmoid); "none"
    masking: bool = False
    vocab: int = 17
    width: int = 6

    @property
    def label(self) -> str:
        activations = "" if self.cell == "CuDNNLSTM" else f"-{self.recurrent_activation}/{self.activation}"
        return f"{self.cell}{activations}-{self.inputs}{'+masking' if self.masking else ''}-{self.head}"


def build(tagger: LSTMTagger, cell: str | None = None, seed: int = 0) -> Any:  # tf_keras.Sequential
    """The tf_keras model (``cell`` overrides the tagger's), random weights small enough for any
    activation."""
    keras2 = tf_keras()
    layers = keras2.layers
    cell = cell or tagger.cell
    stack = input_layers(tagger)
    for index, (merge, units) in enumerate(zip(tagger.merges, tagger.units)):
        if cell == "CuDNNLSTM":
            from tf_keras.src.layers import CuDNNLSTM

            lstm = CuDNNLSTM(units, return_sequences=True, name=f"lstm_{index}")
        else:
            lstm = layers.LSTM(units, return_sequences=True, name=f"lstm_{index}",
                               recurrent_activation=tagger.recurrent_activation,
                               activation=tagger.activation)
        stack.append(lstm if merge is None else
                     layers.Bidirectional(lstm, merge_mode=merge, name=f"bilstm_{index}"))
    if tagger.head == "stack":
        stack += [layers.Dense(7, activation="relu", name="dense_relu"),
                  layers.Dropout(0.5, name="dropout"),
                  layers.TimeDistributed(layers.Dense(4, activation="softmax"), name="tags")]
    elif tagger.head == "dense":
        stack.append(layers.Dense(4, activation="sigmoid", name="tags"))
    model = keras2.Sequential(stack)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def sequences(tagger: LSTMTagger, rng: np.random.Generator, lengths: list[int]) -> list[np.ndarray]:
    if tagger.inputs == "tokens":
        return [rng.integers(0, tagger.vocab, n).astype(np.int32) for n in lengths]
    return [rng.normal(0, 1, (n, tagger.width)).astype(np.float32) for n in lengths]


@dataclass(frozen=True)
class Saved:
    """A saved tagger, the inputs it is checked on, and the authority's outputs for them."""

    path: Path
    inputs: list[np.ndarray]
    expected: list[np.ndarray]


def save(tagger: LSTMTagger, path: Path, lengths: list[int], weights_only: bool = False,
         seed: int = 0) -> Saved:
    """The tagger as tf_keras saves it (``model.save`` or ``save_weights``), and the outputs of
    its authority: for a CuDNNLSTM, the LSTM twin loading the file through tf_keras's converter;
    for an LSTM, the model itself. Each sequence is computed alone."""
    model = build(tagger, seed=seed)
    if weights_only:
        model.save_weights(path)
    else:
        model.save(path)
    if tagger.cell == "CuDNNLSTM":
        model = build(tagger, cell="LSTM")  # sigmoid / tanh: cuDNN's
        model.load_weights(path)
    inputs = sequences(tagger, np.random.default_rng(seed + 1), lengths)
    return Saved(path, inputs, alone(model, inputs))
