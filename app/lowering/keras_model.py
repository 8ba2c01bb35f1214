"""The one builder of Keras 3 models: :class:`~app.spec.ModelSpec` in, ``keras.Model`` out.

The model takes ``(inputs, mask)``: the right-padded inputs, ``ids (batch, steps) int32``
or ``features (batch, steps, F) float32`` (named as the spec's input), and ``mask (batch,
steps) bool`` true on real steps. Keras 3's recurrent layers honour the mask in both
directions, so the backward GRU or LSTM starts at each sequence's last real step, never at
padding. Outputs are ``[outputs, hidden]``: the last Dense layer's per-step output (or the
hidden states when there is none) and the last recurrent layer's merged per-step states.

Each spec layer becomes ``keras.layers.GRU`` or ``keras.layers.LSTM`` (as its variant says),
set from the spec's weights as they are: the spec holds both cells in Keras' own layout
(an LSTM's ``bias (4U,)`` is Keras' single bias row).

Keras 3's ``hard_sigmoid`` is ``relu6(x + 3) / 6``, not Keras 2's ``clip(0.2 x + 0.5, 0, 1)``
that the spec means, so Keras 2's is registered here as a serializable function: a saved
``.keras`` file names it, and ``keras.saving.load_model`` finds it in safe mode once this
module is imported. A feature model's ``Masking`` layer is kept (so a saved model still says
its ``mask_value``); the explicit mask overrides the one it computes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from app.spec import (
    KERAS2_HARD_SIGMOID,
    CellVariant,
    DenseLayer,
    FeatureInput,
    GRUVariant,
    ModelSpec,
    RecurrentLayer,
    TokenInput,
)


@keras.saving.register_keras_serializable(package="bigru_serve", name=KERAS2_HARD_SIGMOID)
def keras2_hard_sigmoid(x: keras.KerasTensor) -> keras.KerasTensor:
    """Keras 2's ``hard_sigmoid``: ``clip(0.2 x + 0.5, 0, 1)``."""
    return keras.ops.clip(0.2 * x + 0.5, 0.0, 1.0)


def gru_activation(name: str) -> str | Callable:
    """The Keras 3 activation computing the spec's ``name`` (see :mod:`app.spec`)."""
    return keras2_hard_sigmoid if name == "hard_sigmoid" else name


def build_keras_model(spec: ModelSpec) -> keras.Model:
    mask = keras.Input(shape=(None,), dtype="bool", name="mask")
    inputs, x = _input(spec.input)
    for index, layer in enumerate(spec.layers):
        x = _recurrent(layer, f"{layer.cell.lower()}{index}_{_keras_name(layer.name)}", x, mask)
    hidden = keras.layers.Identity(name="hidden")(x)
    for index, dense in enumerate(spec.dense):
        last = index == len(spec.dense) - 1
        x = _dense(dense, x, "outputs" if last else f"dense{index}_{_keras_name(dense.name)}")
    outputs = x if spec.dense else keras.layers.Identity(name="outputs")(x)
    return keras.Model(inputs=[inputs, mask], outputs=[outputs, hidden], name=_keras_name(spec.name))


def load_keras_model(path: str | os.PathLike) -> keras.Model:
    """A saved model read back by Keras itself, in safe mode (no stored code is run)."""
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def mask_of(inputs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The model's ``mask`` input for right-padded ``inputs``: true on each sequence's own steps."""
    return np.arange(inputs.shape[1])[None, :] < lengths[:, None]


def _input(spec_input: TokenInput | FeatureInput) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    if isinstance(spec_input, TokenInput):
        ids = keras.Input(shape=(None,), dtype="int32", name=spec_input.name)
        # mask_zero is kept for what the saved model says about id 0; the explicit mask is what runs.
        embedding = keras.layers.Embedding(spec_input.vocab_size, spec_input.width,
                                           mask_zero=spec_input.mask_zero, name="embedding")
        x = embedding(ids)
        embedding.set_weights([spec_input.embeddings])
        return ids, x
    features = keras.Input(shape=(None, spec_input.features), dtype="float32", name=spec_input.name)
    if spec_input.mask_value is None:
        return features, features
    return features, keras.layers.Masking(spec_input.mask_value, name="masking")(features)


def _cell_layer(units: int, variant: CellVariant, name: str) -> keras.layers.RNN:
    """``keras.layers.GRU`` or ``keras.layers.LSTM`` running the variant's equations."""
    activations = {"activation": gru_activation(variant.activation),
                   "recurrent_activation": gru_activation(variant.recurrent_activation)}
    if isinstance(variant, GRUVariant):
        return keras.layers.GRU(units, reset_after=variant.reset_after, return_sequences=True,
                                name=name, **activations)
    return keras.layers.LSTM(units, return_sequences=True, name=name, **activations)


def _cell_weights(layer: RecurrentLayer) -> list:
    """Keras' own weight lists: a ``reset_after=False`` GRU keeps one bias row (see app.spec);
    an LSTM's bias is already Keras' one row."""
    one_row = isinstance(layer.variant, GRUVariant) and not layer.variant.reset_after
    return [w for d in layer.directions()
            for w in (d.kernel, d.recurrent_kernel, d.bias[0] if one_row else d.bias)]


def _recurrent(
    layer: RecurrentLayer, name: str, x: keras.KerasTensor, mask: keras.KerasTensor
) -> keras.KerasTensor:
    if layer.backward is None:
        cell = _cell_layer(layer.units, layer.variant, name)
        x = cell(x, mask=mask)
        cell.set_weights(_cell_weights(layer))
        return x
    wrapper = keras.layers.Bidirectional(_cell_layer(layer.units, layer.variant, layer.cell.lower()),
                                         merge_mode=layer.merge_mode, name=name)
    x = wrapper(x, mask=mask)
    wrapper.set_weights(_cell_weights(layer))
    return x


def _dense(layer: DenseLayer, x: keras.KerasTensor, name: str) -> keras.KerasTensor:
    dense = keras.layers.Dense(layer.units, activation=layer.activation, use_bias=layer.bias is not None,
                               name=name)
    x = dense(x)
    dense.set_weights([layer.kernel] if layer.bias is None else [layer.kernel, layer.bias])
    return x


def _keras_name(name: str) -> str:
    """Keras layer names may not contain '/' and must be unique in a model."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name) or "layer"
