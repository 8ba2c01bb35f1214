"""The one builder of Keras 3 models: :class:`~app.spec.ModelSpec` in, ``keras.Model`` out.

The model takes ``(ids, mask)``: ``ids (batch, steps) int32`` right-padded, and
``mask (batch, steps) bool`` true on real tokens. Keras 3's recurrent layers honour the
mask in both directions, so the backward GRU starts at each sequence's last real token,
never at padding. Outputs are ``[outputs, hidden]``: the head's per-step output (or the
hidden states when there is no head) and the last GRU layer's merged per-step states.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from app.spec import DenseHead, ModelSpec, RecurrentLayer


def build_keras_model(spec: ModelSpec) -> keras.Model:
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    mask = keras.Input(shape=(None,), dtype="bool", name="mask")
    # mask_zero is kept for what the saved model says about id 0; the explicit mask is what runs.
    embedding = keras.layers.Embedding(spec.vocab_size, spec.embedding_width, mask_zero=spec.mask_zero,
                                       name="embedding")
    x = embedding(ids)
    embedding.set_weights([spec.embeddings])
    for index, layer in enumerate(spec.layers):
        x = _recurrent(layer, f"gru{index}_{_keras_name(layer.name)}", x, mask)
    hidden = keras.layers.Identity(name="hidden")(x)
    outputs = _head(spec.head, x) if spec.head else keras.layers.Identity(name="outputs")(x)
    return keras.Model(inputs=[ids, mask], outputs=[outputs, hidden], name=_keras_name(spec.name))


def load_keras_model(path: str | os.PathLike) -> keras.Model:
    """A saved model read back by Keras itself, in safe mode (no stored code is run)."""
    return keras.saving.load_model(path, safe_mode=True, compile=False)


def mask_of(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The model's ``mask`` input for right-padded ``ids``: true on each sequence's own tokens."""
    return np.arange(ids.shape[1])[None, :] < lengths[:, None]


def _gru(units: int, name: str) -> keras.layers.GRU:
    # These settings are cuDNN's GRU equations; see app.spec.
    return keras.layers.GRU(
        units, activation="tanh", recurrent_activation="sigmoid", reset_after=True,
        return_sequences=True, name=name,
    )


def _recurrent(
    layer: RecurrentLayer, name: str, x: keras.KerasTensor, mask: keras.KerasTensor
) -> keras.KerasTensor:
    if layer.backward is None:
        gru = _gru(layer.units, name)
        x = gru(x, mask=mask)
        gru.set_weights([layer.forward.kernel, layer.forward.recurrent_kernel, layer.forward.bias])
        return x
    wrapper = keras.layers.Bidirectional(_gru(layer.units, "gru"), merge_mode=layer.merge_mode, name=name)
    x = wrapper(x, mask=mask)
    wrapper.set_weights([w for d in layer.directions() for w in (d.kernel, d.recurrent_kernel, d.bias)])
    return x


def _head(head: DenseHead, x: keras.KerasTensor) -> keras.KerasTensor:
    dense = keras.layers.Dense(head.units, activation=head.activation, use_bias=head.bias is not None,
                               name="outputs")
    x = dense(x)
    dense.set_weights([head.kernel] if head.bias is None else [head.kernel, head.bias])
    return x


def _keras_name(name: str) -> str:
    """Keras layer names may not contain '/' and must be unique in a model."""
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name) or "layer"
