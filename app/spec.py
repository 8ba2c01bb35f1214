"""The one canonical description of a servable model.

Every file format is read into a :class:`ModelSpec`; everything downstream (the Keras
builder, the ONNX builder, the runner, the API, exports) reads only this.

A model is: an input (token ids through an ``Embedding``, or a float feature vector per
step) -> one or more (bidirectional) recurrent layers, each a GRU or an LSTM (a stack may
mix them) -> zero or more per-step ``Dense`` layers. A layer's cell is told by its variant
(:class:`GRUVariant` or :class:`LSTMVariant`), and its weights are that cell's
(:class:`GRUWeights` or :class:`LSTMWeights`).

GRU weights are held in the Keras layout, whatever the source was:

- ``kernel (I, 3U)``, ``recurrent_kernel (U, 3U)``, ``bias (2, 3U)``;
- column blocks are the gates z, r, h; bias row 0 is the input bias, row 1 the recurrent one.

Each layer carries its :class:`GRUVariant`: ``reset_after`` and the two activations
(``f`` = ``recurrent_activation``, ``g`` = ``activation``). One step is::

    x_z, x_r, x_h = x @ kernel + bias[0]
    m_z, m_r, m_h = h @ recurrent_kernel + bias[1]
    z = f(x_z + m_z);  r = f(x_r + m_r)
    reset_after=True  (cuDNN, PyTorch, TF2 tf.keras):   hh = g(x_h + r * m_h)
    reset_after=False (Keras 2's default):              hh = g(x_h + (r * h) @ recurrent_kernel[:, 2U:])
    h' = z * h + (1 - z) * hh

With ``reset_after=False`` Keras stores one bias row ``(3U,)``, added on the input side. The
spec still holds ``bias (2, 3U)``: that row is row 0 and row 1 is all zeros (every recurrent
bias of that form adds outside the reset product, so one row holds them all exactly, and
every consumer reads one shape). :meth:`GRUWeights.validate` enforces the zero row.

cuDNN's GRU is ``GRUVariant()``: reset_after, sigmoid, tanh. The activations a GRU may
carry are those both engines compute exactly (ONNX ``GRU`` activation in brackets)::

    sigmoid       1 / (1 + exp(-x))                        (Sigmoid)
    hard_sigmoid  clip(0.2 x + 0.5, 0, 1)  -- Keras 2's    (HardSigmoid alpha=0.2 beta=0.5)
    tanh, relu, linear (x), softsign x / (1 + |x|), softplus log(1 + exp(x)),
    elu           x if x > 0 else exp(x) - 1               (Elu alpha=1)

Keras 3 redefined ``hard_sigmoid`` as ``relu6(x + 3) / 6``; the name here always means
Keras 2's formula above (what a Keras 2 file that says ``hard_sigmoid`` was trained with).

LSTM weights are held in the Keras layout too: ``kernel (I, 4U)``, ``recurrent_kernel (U, 4U)``,
``bias (4U,)``, column blocks the gates i, f, c, o. cuDNN's two bias vectors both add outside
every product, so their sum is exact in one row. With ``f`` = ``recurrent_activation`` and
``g`` = ``activation`` (cuDNN's: sigmoid, tanh; Keras 2's LSTM defaulted to hard_sigmoid)::

    z_i, z_f, z_c, z_o = x @ kernel + h @ recurrent_kernel + bias
    i = f(z_i);  f_ = f(z_f);  o = f(z_o);  c' = f_ * c + i * g(z_c);  h' = o * g(c')

The activations an LSTM may carry are the GRU's list below.

A ``Dense`` layer computes ``y = act(x @ kernel + bias)`` per step, ``act`` one of
:data:`DENSE_ACTIVATIONS` (softmax over the last axis).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

from app.errors import ModelError

MergeMode = Literal["concat", "sum", "ave", "mul"]
MERGE_MODES: tuple[str, ...] = ("concat", "sum", "ave", "mul")
DENSE_ACTIVATIONS: tuple[str, ...] = ("linear", "softmax", "sigmoid", "tanh", "relu")
GRU_ACTIVATIONS: tuple[str, ...] = (
    "sigmoid", "hard_sigmoid", "tanh", "relu", "linear", "softsign", "softplus", "elu")
# The name Keras 2's hard_sigmoid is registered under in the Keras 3 files the builder writes.
KERAS2_HARD_SIGMOID = "keras2_hard_sigmoid"


@dataclass(frozen=True)
class GRUVariant:
    """Which GRU equations a layer runs (see the module docstring). Default: cuDNN's."""

    reset_after: bool = True
    recurrent_activation: str = "sigmoid"
    activation: str = "tanh"
    cell: ClassVar[str] = "GRU"
    gates: ClassVar[int] = 3
    states: ClassVar[int] = 1  # h

    @property
    def is_cudnn(self) -> bool:
        return self == CUDNN

    def validate(self, where: str) -> None:
        _validate_activations(self, where)

    def describe(self) -> dict:
        return {"reset_after": self.reset_after, "recurrent_activation": self.recurrent_activation,
                "activation": self.activation}

    def __str__(self) -> str:
        return (f"GRU(reset_after={self.reset_after}, recurrent_activation="
                f"{self.recurrent_activation!r}, activation={self.activation!r})")


CUDNN = GRUVariant()


@dataclass(frozen=True)
class LSTMVariant:
    """Which LSTM equations a layer runs (see the module docstring). Default: cuDNN's."""

    recurrent_activation: str = "sigmoid"
    activation: str = "tanh"
    cell: ClassVar[str] = "LSTM"
    gates: ClassVar[int] = 4
    states: ClassVar[int] = 2  # h and c

    @property
    def is_cudnn(self) -> bool:
        return self == CUDNN_LSTM

    def validate(self, where: str) -> None:
        _validate_activations(self, where)

    def describe(self) -> dict:
        return {"recurrent_activation": self.recurrent_activation, "activation": self.activation}

    def __str__(self) -> str:
        return (f"LSTM(recurrent_activation={self.recurrent_activation!r}, "
                f"activation={self.activation!r})")


CUDNN_LSTM = LSTMVariant()
CellVariant = GRUVariant | LSTMVariant


def _validate_activations(variant: CellVariant, where: str) -> None:
    for role in ("recurrent_activation", "activation"):
        value = getattr(variant, role)
        if value not in GRU_ACTIVATIONS:
            raise ModelError(f"{where}: {role}={value!r} is not supported "
                             f"(supported: {', '.join(GRU_ACTIVATIONS)})")


@dataclass(frozen=True)
class _KerasWeights:
    """One direction of one recurrent layer in Keras layout: ``kernel (I, gates*U)``,
    ``recurrent_kernel (U, gates*U)`` and the cell's bias."""

    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    bias: np.ndarray
    variant_type: ClassVar[type]

    @property
    def units(self) -> int:
        return int(self.recurrent_kernel.shape[0])

    @property
    def input_width(self) -> int:
        return int(self.kernel.shape[0])

    def bias_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def validate(self, where: str, input_width: int, variant: CellVariant) -> None:
        if not isinstance(variant, self.variant_type):
            raise ModelError(f"{where}: {self.variant_type.cell} weights in a layer that says {variant}")
        gates, units = self.variant_type.gates, self.units
        expected = {"kernel": (input_width, gates * units), "recurrent_kernel": (units, gates * units),
                    "bias": self.bias_shape()}
        for name, shape in expected.items():
            actual = getattr(self, name).shape
            if actual != shape:
                raise ModelError(f"{where}: {name} has shape {actual}, expected {shape}")


@dataclass(frozen=True)
class GRUWeights(_KerasWeights):
    """One direction of one GRU layer, in Keras layout (bias always ``(2, 3U)``)."""

    variant_type: ClassVar[type] = GRUVariant

    def bias_shape(self) -> tuple[int, ...]:
        return (2, 3 * self.units)

    def validate(self, where: str, input_width: int, variant: CellVariant) -> None:
        super().validate(where, input_width, variant)
        if not variant.reset_after and np.any(self.bias[1]):  # type: ignore[union-attr]
            raise ModelError(f"{where}: reset_after=False keeps its one bias row in row 0; "
                             "row 1 must be zeros")


@dataclass(frozen=True)
class LSTMWeights(_KerasWeights):
    """One direction of one LSTM layer, in Keras layout: gates i, f, c, o; bias ``(4U,)``."""

    variant_type: ClassVar[type] = LSTMVariant

    def bias_shape(self) -> tuple[int, ...]:
        return (4 * self.units,)


CellWeights = GRUWeights | LSTMWeights


@dataclass(frozen=True)
class RecurrentLayer:
    """A GRU or LSTM layer (as its variant says): forward only, or forward + backward merged
    per step."""

    name: str
    forward: CellWeights
    backward: CellWeights | None = None
    merge_mode: MergeMode = "concat"
    variant: CellVariant = CUDNN

    @property
    def cell(self) -> str:
        """``"GRU"`` or ``"LSTM"``."""
        return self.variant.cell

    @property
    def units(self) -> int:
        return self.forward.units

    @property
    def state_floats(self) -> int:
        """Floats of recurrent state one sequence keeps per step (h, and c for an LSTM)."""
        return self.units * len(self.directions()) * self.variant.states

    @property
    def bidirectional(self) -> bool:
        return self.backward is not None

    @property
    def output_width(self) -> int:
        both = self.bidirectional and self.merge_mode == "concat"
        return 2 * self.units if both else self.units

    def directions(self) -> list[CellWeights]:
        return [self.forward] if self.backward is None else [self.forward, self.backward]


@dataclass(frozen=True)
class DenseLayer:
    """A per-step ``Dense`` (or ``TimeDistributed(Dense)``) after the recurrent stack."""

    name: str
    kernel: np.ndarray
    bias: np.ndarray | None
    activation: str = "linear"

    @property
    def units(self) -> int:
        return int(self.kernel.shape[1])

    def validate(self, width: int) -> None:
        if self.kernel.ndim != 2 or self.kernel.shape[0] != width:
            raise ModelError(
                f"{self.name}: kernel has shape {self.kernel.shape}, expected ({width}, units)")
        if self.bias is not None and self.bias.shape != (self.units,):
            raise ModelError(f"{self.name}: bias has shape {self.bias.shape}, expected ({self.units},)")
        if self.activation not in DENSE_ACTIVATIONS:
            raise ModelError(f"{self.name}: unsupported activation {self.activation!r} "
                             f"(supported: {', '.join(DENSE_ACTIVATIONS)})")


@dataclass(frozen=True)
class TokenInput:
    """Token ids through an ``Embedding (V, D)``: per sequence, ids ``(steps,) int32``.

    With ``mask_zero`` the model skips id 0 as padding (state carried over); requests are
    unpadded, so id 0 is refused instead of computed differently (see :attr:`id_range`).
    """

    embeddings: np.ndarray
    mask_zero: bool = False
    kind: ClassVar[str] = "tokens"
    name: ClassVar[str] = "ids"  # the engines' and exports' input name
    dtype: ClassVar[type] = np.int32

    @property
    def vocab_size(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def width(self) -> int:
        """The width of what the first recurrent layer reads."""
        return int(self.embeddings.shape[1])

    @property
    def id_range(self) -> tuple[int, int]:
        """Ids a request may carry: ``[low, high)``."""
        return (1 if self.mask_zero else 0), self.vocab_size

    def blank(self, batch: int, steps: int) -> np.ndarray:
        return np.zeros((batch, steps), self.dtype)

    def sample(self, rng: np.random.Generator, steps: int) -> np.ndarray:
        """A pseudo-random valid sequence (timing and probe work, never a reference)."""
        return rng.integers(*self.id_range, steps).astype(self.dtype)

    def validate(self) -> None:
        if self.embeddings.ndim != 2:
            raise ModelError(f"embedding: expected a 2-D matrix, got shape {self.embeddings.shape}")

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "width": self.width,
                "mask_zero": self.mask_zero}


@dataclass(frozen=True)
class FeatureInput:
    """A float vector per step, fed straight to the first recurrent layer: ``(steps, features)``.

    ``mask_value`` is set when the model starts with a ``Masking`` layer: a step whose every
    feature equals it is padding to that model (skipped, state carried over). Requests are
    unpadded, so such a step is refused instead of computed differently.
    """

    features: int
    mask_value: float | None = None
    kind: ClassVar[str] = "features"
    name: ClassVar[str] = "features"
    dtype: ClassVar[type] = np.float32

    @property
    def width(self) -> int:
        return self.features

    def blank(self, batch: int, steps: int) -> np.ndarray:
        return np.zeros((batch, steps, self.features), self.dtype)

    def sample(self, rng: np.random.Generator, steps: int) -> np.ndarray:
        """A pseudo-random valid sequence (normal features: never a whole step at ``mask_value``)."""
        return rng.standard_normal((steps, self.features)).astype(self.dtype)

    def validate(self) -> None:
        if self.features < 1:
            raise ModelError(f"input: {self.features} features per step")

    def describe(self) -> dict:
        return {"kind": self.kind, "features": self.features, "mask_value": self.mask_value}


ModelInput = TokenInput | FeatureInput


@dataclass(frozen=True)
class Source:
    """Where a spec came from, for ``/v1/model`` and logs."""

    path: str
    format: str
    conversion: str
    keras_version: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Input -> GRU / LSTM stack -> per-step Dense stack (possibly empty)."""

    name: str
    input: ModelInput
    layers: tuple[RecurrentLayer, ...]
    dense: tuple[DenseLayer, ...]
    source: Source
    notes: tuple[str, ...] = field(default=())

    @property
    def vocab_size(self) -> int | None:
        return self.input.vocab_size if isinstance(self.input, TokenInput) else None

    @property
    def hidden_width(self) -> int:
        return self.layers[-1].output_width

    @property
    def output_width(self) -> int:
        return self.dense[-1].units if self.dense else self.hidden_width

    def validate(self) -> ModelSpec:
        """Check every shape against its neighbours; raise :class:`ModelError` naming the layer."""
        self.input.validate()
        if not self.layers:
            raise ModelError("the model has no recurrent (GRU or LSTM) layer")
        width = self.input.width
        for layer in self.layers:
            if layer.merge_mode not in MERGE_MODES:
                raise ModelError(f"{layer.name}: unsupported merge_mode {layer.merge_mode!r}")
            layer.variant.validate(layer.name)
            for direction, weights in zip(("forward", "backward"), layer.directions()):
                weights.validate(f"{layer.name} ({direction})", width, layer.variant)
            if layer.backward is not None and layer.backward.units != layer.forward.units:
                raise ModelError(f"{layer.name}: forward and backward have different units")
            width = layer.output_width
        for dense in self.dense:
            dense.validate(width)
            width = dense.units
        return self

    def describe(self) -> dict:
        """A JSON-ready summary of the architecture."""
        return {
            "input": self.input.describe(),
            "recurrent": [
                {"name": layer.name, "type": layer.cell, "units": layer.units,
                 "bidirectional": layer.bidirectional,
                 "merge_mode": layer.merge_mode if layer.bidirectional else None,
                 "output_width": layer.output_width, **layer.variant.describe()}
                for layer in self.layers
            ],
            "dense": [{"name": d.name, "units": d.units, "activation": d.activation,
                       "use_bias": d.bias is not None} for d in self.dense],
            "output_width": self.output_width,
            "hidden_width": self.hidden_width,
        }
