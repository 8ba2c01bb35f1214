"""An independent NumPy GRU and LSTM, written from cuDNN's own definitions and Keras 2's, and
writers that encode native weights into each file layout the service reads.

cuDNN's GRU (per layer and direction; matrices are (U, in) and compute ``W @ x``)::

    r  = sigmoid(W_r x + bW_r + R_r h + bR_r)
    z  = sigmoid(W_z x + bW_z + R_z h + bR_z)
    hh = tanh(W_h x + bW_h + r * (R_h h + bR_h))
    h' = (1 - z) * hh + z * h

Keras 2's ``GRU`` (``keras/layers/recurrent.py``) generalises it: ``f`` =
``recurrent_activation`` for r and z, ``g`` = ``activation`` for hh, and with
``reset_after=False`` (its default, and the only form before Keras 2.2) the reset gate
multiplies the state *before* the recurrent matmul, with one bias (the sum of both here)::

    hh = g(W_h x + bW_h + R_h (r * h) + bR_h)

cuDNN's LSTM (gates i, f, c, o; Keras 2's ``LSTM`` puts ``f`` = ``recurrent_activation`` in
place of sigmoid and ``g`` = ``activation`` in place of tanh)::

    i  = sigmoid(W_i x + bW_i + R_i h + bR_i)
    f  = sigmoid(W_f x + bW_f + R_f h + bR_f)
    o  = sigmoid(W_o x + bW_o + R_o h + bR_o)
    c' = f * c + i * tanh(W_c x + bW_c + R_c h + bR_c)
    h' = o * tanh(c')

Keras 2's ``hard_sigmoid`` is ``clip(0.2 x + 0.5, 0, 1)`` (``keras/backend``); Keras 3's
``relu6(x + 3) / 6`` is a different function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Native:
    """One direction of one layer in cuDNN's terms: gate -> matrix / bias (a GRU's gates
    r, z, h; an LSTM's i, f, c, o)."""

    W: dict[str, np.ndarray]  # (U, in)
    R: dict[str, np.ndarray]  # (U, U)
    bW: dict[str, np.ndarray]  # (U,)
    bR: dict[str, np.ndarray]  # (U,)

    @property
    def units(self) -> int:
        return next(iter(self.R.values())).shape[0]

    @property
    def width(self) -> int:
        return next(iter(self.W.values())).shape[1]


GRU_GATES, LSTM_GATES = "rzh", "ifco"


def random_native(rng: np.random.Generator, width: int, units: int, scale: float = 0.5,
                  gates: str = GRU_GATES) -> Native:
    def draw(*shape: int) -> np.ndarray:
        return rng.uniform(-scale, scale, shape).astype(np.float32)

    return Native(
        W={g: draw(units, width) for g in gates},
        R={g: draw(units, units) for g in gates},
        bW={g: draw(units) for g in gates},
        bR={g: draw(units) for g in gates},
    )


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# Keras 2's definitions (keras/activations.py, keras/backend), written out.
GRU_ACTIVATIONS = {
    "sigmoid": sigmoid,
    "hard_sigmoid": lambda x: np.clip(0.2 * x + 0.5, 0.0, 1.0),
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "linear": lambda x: x,
    "softsign": lambda x: x / (1.0 + np.abs(x)),
    "softplus": lambda x: np.logaddexp(0.0, x),  # log(1 + exp(x)), without overflow
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
}


@dataclass(frozen=True)
class Variant:
    """Which cell: cuDNN's GRU by default (``reset_after`` means nothing to an LSTM)."""

    reset_after: bool = True
    recurrent_activation: str = "sigmoid"
    activation: str = "tanh"
    cell: str = "GRU"

    @property
    def gates(self) -> str:
        return LSTM_GATES if self.cell == "LSTM" else GRU_GATES


CUDNN = Variant()
CUDNN_LSTM = Variant(cell="LSTM")


def run_lstm(native: Native, x: np.ndarray, variant: Variant = CUDNN_LSTM) -> np.ndarray:
    """``x (T, in)`` -> states ``(T, U)`` of an LSTM from zero ``h`` and ``c``, in float64."""
    f, g = GRU_ACTIVATIONS[variant.recurrent_activation], GRU_ACTIVATIONS[variant.activation]

    def gate(name: str, x_t: np.ndarray, h: np.ndarray) -> np.ndarray:
        return (native.W[name].astype(np.float64) @ x_t + native.bW[name]
                + native.R[name].astype(np.float64) @ h + native.bR[name])

    h, c, states = np.zeros(native.units), np.zeros(native.units), []
    for x_t in x.astype(np.float64):
        i, forget, o = (f(gate(name, x_t, h)) for name in "ifo")
        c = forget * c + i * g(gate("c", x_t, h))
        h = o * g(c)
        states.append(h)
    return np.array(states)


def run_direction(native: Native, x: np.ndarray, variant: Variant = CUDNN) -> np.ndarray:
    """``x (T, in)`` -> states ``(T, U)``, in float64 for a clean reference."""
    if variant.cell == "LSTM":
        return run_lstm(native, x, variant)
    W = {g: native.W[g].astype(np.float64) for g in "rzh"}
    R = {g: native.R[g].astype(np.float64) for g in "rzh"}
    f, g = GRU_ACTIVATIONS[variant.recurrent_activation], GRU_ACTIVATIONS[variant.activation]
    h = np.zeros(native.units)
    states = []
    for x_t in x.astype(np.float64):
        r = f(W["r"] @ x_t + native.bW["r"] + R["r"] @ h + native.bR["r"])
        z = f(W["z"] @ x_t + native.bW["z"] + R["z"] @ h + native.bR["z"])
        if variant.reset_after:
            hh = g(W["h"] @ x_t + native.bW["h"] + r * (R["h"] @ h + native.bR["h"]))
        else:
            hh = g(W["h"] @ x_t + native.bW["h"] + R["h"] @ (r * h) + native.bR["h"])
        h = (1 - z) * hh + z * h
        states.append(h)
    return np.array(states)


MERGES = {
    "concat": lambda f, b: np.concatenate([f, b], axis=-1),
    "sum": lambda f, b: f + b,
    "ave": lambda f, b: (f + b) / 2,
    "mul": lambda f, b: f * b,
}


def activation(name: str, x: np.ndarray) -> np.ndarray:
    if name == "softmax":
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return {"linear": lambda v: v, "sigmoid": sigmoid, "tanh": np.tanh,
            "relu": lambda v: np.maximum(v, 0)}[name](x)


@dataclass
class NativeModel:
    """``embeddings`` None: the model takes feature vectors ``(T, width)``. ``stack``: Dense
    layers ``(kernel, bias, activation)`` before the head."""

    embeddings: np.ndarray | None
    layers: list[tuple[Native, Native | None]]
    merge_mode: str
    head_kernel: np.ndarray | None
    head_bias: np.ndarray | None
    head_activation: str = "softmax"
    variant: Variant = CUDNN
    stack: list[tuple[np.ndarray, np.ndarray, str]] = field(default_factory=list)
    variants: list[Variant] | None = None  # per layer, for a mixed stack (else ``variant``)
    merge_modes: list[str] | None = None  # per layer (else ``merge_mode``)

    def layer_variant(self, index: int) -> Variant:
        return self.variants[index] if self.variants else self.variant

    def layer_merge(self, index: int) -> str:
        return self.merge_modes[index] if self.merge_modes else self.merge_mode

    def hidden(self, inputs: np.ndarray) -> np.ndarray:
        x = inputs if self.embeddings is None else self.embeddings[inputs]
        for index, (forward, backward) in enumerate(self.layers):
            variant = self.layer_variant(index)
            f = run_direction(forward, x, variant)
            if backward is None:
                x = f
            else:
                x = MERGES[self.layer_merge(index)](f, run_direction(backward, x[::-1], variant)[::-1])
        return x

    def outputs(self, inputs: np.ndarray) -> np.ndarray:
        x = self.hidden(inputs)
        for kernel, bias, name in self.stack:
            x = activation(name, x @ kernel + bias)
        if self.head_kernel is None:
            return x
        return activation(self.head_activation, x @ self.head_kernel + self.head_bias)


def npz_engine(arrays: dict[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
    """What a C++ engine does with the documented ``.npz`` export layout
    (app/lowering/exports.py), in NumPy: ids or feature vectors in, the last layer's rows out."""
    meta = json.loads(str(arrays["meta"]))

    def run_lstm(kernel: np.ndarray, recurrent: np.ndarray, bias: np.ndarray, x: np.ndarray,
                 f: object, g: object) -> np.ndarray:
        h, c, states = np.zeros(recurrent.shape[0]), np.zeros(recurrent.shape[0]), []
        for x_t in x.astype(np.float64):
            zi, zf, zc, zo = np.split(x_t @ kernel + h @ recurrent + bias, 4)
            c = f(zf) * c + f(zi) * g(zc)
            h = f(zo) * g(c)
            states.append(h)
        return np.array(states)

    def run(prefix: str, x: np.ndarray, layer: dict) -> np.ndarray:
        kernel, recurrent, bias = (arrays[f"{prefix}.{n}"] for n in ("kernel", "recurrent_kernel", "bias"))
        f = GRU_ACTIVATIONS[layer["recurrent_activation"]]
        g = GRU_ACTIVATIONS[layer["activation"]]
        if layer["type"] == "LSTM":
            return run_lstm(kernel, recurrent, bias, x, f, g)
        h, states = np.zeros(recurrent.shape[0]), []
        for x_t in x.astype(np.float64):
            xz, xr, xh = np.split(x_t @ kernel + bias[0], 3)
            mz, mr, mh = np.split(h @ recurrent + bias[1], 3)
            z, r = f(xz + mz), f(xr + mr)
            # reset_after=False: the reset gate scales the state before its matmul
            hh = g(xh + r * mh) if layer["reset_after"] else g(xh + (r * h) @ recurrent[:, 2 * len(h):])
            h = z * h + (1 - z) * hh
            states.append(h)
        return np.array(states)

    x = arrays["embeddings"][inputs] if meta["input"]["kind"] == "tokens" else inputs
    for index, layer in enumerate(meta["recurrent"]):
        forward = run(f"layer{index}.forward", x, layer)
        if layer["bidirectional"]:
            backward = run(f"layer{index}.backward", x[::-1], layer)[::-1]
            x = MERGES[layer["merge_mode"]](forward, backward)
        else:
            x = forward
    for index, dense in enumerate(meta["dense"]):
        bias = arrays.get(f"dense{index}.bias", 0.0)
        x = activation(dense["activation"], x @ arrays[f"dense{index}.kernel"] + bias)
    return x


def random_model(rng: np.random.Generator, vocab: int | None, width: int, units: int | tuple[int, ...],
                 layers: int, bidirectional: bool = True, merge_mode: str = "concat",
                 head: int | None = 5, head_activation: str = "softmax", variant: Variant = CUDNN,
                 stack: tuple[tuple[int, str], ...] = (), scale: float = 0.5,
                 variants: tuple[Variant, ...] | None = None,
                 merge_modes: tuple[str, ...] | None = None) -> NativeModel:
    """``vocab`` None: a feature-vector model; ``units``: one width, or one per layer;
    ``stack``: (units, activation) Dense layers before the head; ``scale``: recurrent weights
    are uniform in [-scale, scale]; ``variants`` / ``merge_modes``: one per layer (a mixed
    stack), else ``variant`` / ``merge_mode`` for all."""
    embeddings = None if vocab is None else rng.normal(0, 1, (vocab, width)).astype(np.float32)
    recurrent, in_width = [], width
    for index in range(layers):
        layer_variant = variants[index] if variants else variant
        layer_units = units[index] if isinstance(units, tuple) else units
        layer_merge = merge_modes[index] if merge_modes else merge_mode
        forward = random_native(rng, in_width, layer_units, scale, layer_variant.gates)
        backward = random_native(rng, in_width, layer_units, scale, layer_variant.gates) \
            if bidirectional else None
        if layer_variant.cell == "GRU" and not layer_variant.reset_after:  # Keras stores only the sum
            forward.bR = {g: np.zeros_like(b) for g, b in forward.bR.items()}
            if backward is not None:
                backward.bR = {g: np.zeros_like(b) for g, b in backward.bR.items()}
        recurrent.append((forward, backward))
        in_width = 2 * layer_units if bidirectional and layer_merge == "concat" else layer_units
    dense = []
    for size, name in stack:
        dense.append((rng.normal(0, 0.5, (in_width, size)).astype(np.float32),
                      rng.normal(0, 0.1, size).astype(np.float32), name))
        in_width = size
    kernel = rng.normal(0, 0.5, (in_width, head)).astype(np.float32) if head else None
    bias = rng.normal(0, 0.1, head).astype(np.float32) if head else None
    return NativeModel(embeddings, recurrent, merge_mode, kernel, bias, head_activation, variant, dense,
                       list(variants) if variants else None, list(merge_modes) if merge_modes else None)


# --- encoders: cuDNN-native weights -> each file layout ---------------------------------

def to_cudnngru(native: Native) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keras 2 ``CuDNNGRU`` weights: each (U, in) matrix's raw row-major bytes stored as an
    (in, U) block, gates z, r, h; bias = [input z, r, h | recurrent z, r, h]."""
    units, width = native.W["z"].shape
    kernel = np.hstack([np.frombuffer(native.W[g].tobytes(), np.float32).reshape(width, units)
                        for g in "zrh"])
    recurrent = np.hstack([np.frombuffer(native.R[g].tobytes(), np.float32).reshape(units, units)
                           for g in "zrh"])
    bias = np.concatenate([native.bW[g] for g in "zrh"] + [native.bR[g] for g in "zrh"])
    return kernel, recurrent, bias


def to_keras_gru(native: Native, reset_after: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keras ``GRU``: x @ kernel, so kernel blocks are W.T; gates z, r, h. ``reset_after``:
    bias rows (input, recurrent); otherwise one row, the sum (every bias adds outside r)."""
    kernel = np.hstack([native.W[g].T for g in "zrh"])
    recurrent = np.hstack([native.R[g].T for g in "zrh"])
    bias = np.stack([np.concatenate([native.bW[g] for g in "zrh"]),
                     np.concatenate([native.bR[g] for g in "zrh"])])
    return kernel, recurrent, bias if reset_after else bias.sum(axis=0)


def to_torch(native: Native) -> dict[str, np.ndarray]:
    """PyTorch ``nn.GRU``: row blocks r, z, n."""
    return {
        "weight_ih": np.vstack([native.W[g] for g in "rzh"]),
        "weight_hh": np.vstack([native.R[g] for g in "rzh"]),
        "bias_ih": np.concatenate([native.bW[g] for g in "rzh"]),
        "bias_hh": np.concatenate([native.bR[g] for g in "rzh"]),
    }


def to_tf1_canonical(native: Native) -> dict[str, np.ndarray]:
    """TF 1.x ``cudnn_compatible_gru_cell``: gates r then z; only bias sums are stored."""
    W, R, bW, bR = native.W, native.R, native.bW, native.bR
    return {
        "gates/kernel": np.vstack([np.hstack([W["r"].T, W["z"].T]), np.hstack([R["r"].T, R["z"].T])]),
        "gates/bias": np.concatenate([bW["r"] + bR["r"], bW["z"] + bR["z"]]),
        "candidate/input_projection/kernel": W["h"].T,
        "candidate/input_projection/bias": bW["h"],
        "candidate/hidden_projection/kernel": R["h"].T,
        "candidate/hidden_projection/bias": bR["h"],
    }


def _raw_blocks(matrices: list[np.ndarray]) -> np.ndarray:
    """Each ``(U, in)`` matrix's row-major bytes stored as an ``(in, U)`` block, side by side
    (how ``CuDNNGRU`` / ``CuDNNLSTM`` hand kernels to cuDNN)."""
    return np.hstack([np.frombuffer(m.tobytes(), np.float32).reshape(m.shape[1], m.shape[0])
                      for m in matrices])


def to_cudnnlstm(native: Native) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keras 2 ``CuDNNLSTM`` weights: raw-byte kernel blocks, gates i, f, c, o; bias (8U,) =
    [input i, f, c, o | recurrent i, f, c, o]."""
    gates = LSTM_GATES
    bias = np.concatenate([native.bW[g] for g in gates] + [native.bR[g] for g in gates])
    return _raw_blocks([native.W[g] for g in gates]), _raw_blocks([native.R[g] for g in gates]), bias


def to_keras_lstm(native: Native) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keras ``LSTM``: x @ kernel, so kernel blocks are W.T; gates i, f, c, o; one bias, the sum."""
    gates = LSTM_GATES
    return (np.hstack([native.W[g].T for g in gates]), np.hstack([native.R[g].T for g in gates]),
            np.concatenate([native.bW[g] + native.bR[g] for g in gates]))


def to_torch_lstm(native: Native) -> dict[str, np.ndarray]:
    """PyTorch ``nn.LSTM``: row blocks i, f, g, o (g is the cell candidate, cuDNN's c)."""
    gates = LSTM_GATES
    return {
        "weight_ih": np.vstack([native.W[g] for g in gates]),
        "weight_hh": np.vstack([native.R[g] for g in gates]),
        "bias_ih": np.concatenate([native.bW[g] for g in gates]),
        "bias_hh": np.concatenate([native.bR[g] for g in gates]),
    }


def to_tf1_canonical_lstm(native: Native) -> dict[str, np.ndarray]:
    """TF 1.x ``cudnn_compatible_lstm_cell``: ``kernel (I+U, 4U)`` (rows x then h) and the
    bias sums, both in TF's own gate order i, c, f, o (what ``CudnnLSTMSaveable`` writes)."""
    order = "icfo"
    return {
        "kernel": np.vstack([np.hstack([native.W[g].T for g in order]),
                             np.hstack([native.R[g].T for g in order])]),
        "bias": np.concatenate([native.bW[g] + native.bR[g] for g in order]),
    }
