"""The one canonical description of a servable model.

Every file format is read into a :class:`ModelSpec`; everything downstream (the Keras
builder, the ONNX builder, the runner, the API, exports) reads only this. Weights held
here are already in Keras 3 ``GRU(reset_after=True)`` layout, whatever the source was:

- ``kernel (I, 3U)``, ``recurrent_kernel (U, 3U)``, ``bias (2, 3U)``;
- column blocks are the gates z, r, h; bias row 0 is the input bias, row 1 the recurrent one.

With that layout one step of a GRU is (the cuDNN equations, reset applied after the
recurrent matmul)::

    x_z, x_r, x_h = x @ kernel + bias[0]
    m_z, m_r, m_h = h @ recurrent_kernel + bias[1]
    z = sigmoid(x_z + m_z);  r = sigmoid(x_r + m_r)
    hh = tanh(x_h + r * m_h)
    h' = z * h + (1 - z) * hh
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app.errors import ModelError

MergeMode = Literal["concat", "sum", "ave", "mul"]
MERGE_MODES: tuple[str, ...] = ("concat", "sum", "ave", "mul")
ACTIVATIONS: tuple[str, ...] = ("linear", "softmax", "sigmoid", "tanh", "relu")


@dataclass(frozen=True)
class GRUWeights:
    """One direction of one GRU layer, in Keras 3 layout."""

    kernel: np.ndarray
    recurrent_kernel: np.ndarray
    bias: np.ndarray

    @property
    def units(self) -> int:
        return int(self.recurrent_kernel.shape[0])

    @property
    def input_width(self) -> int:
        return int(self.kernel.shape[0])

    def validate(self, where: str, input_width: int) -> None:
        units = self.units
        expected = {
            "kernel": (input_width, 3 * units),
            "recurrent_kernel": (units, 3 * units),
            "bias": (2, 3 * units),
        }
        for name, shape in expected.items():
            actual = getattr(self, name).shape
            if actual != shape:
                raise ModelError(f"{where}: {name} has shape {actual}, expected {shape}")


@dataclass(frozen=True)
class RecurrentLayer:
    """A GRU layer: forward only, or forward + backward merged per step."""

    name: str
    forward: GRUWeights
    backward: GRUWeights | None = None
    merge_mode: MergeMode = "concat"

    @property
    def units(self) -> int:
        return self.forward.units

    @property
    def bidirectional(self) -> bool:
        return self.backward is not None

    @property
    def output_width(self) -> int:
        both = self.bidirectional and self.merge_mode == "concat"
        return 2 * self.units if both else self.units

    def directions(self) -> list[GRUWeights]:
        return [self.forward] if self.backward is None else [self.forward, self.backward]


@dataclass(frozen=True)
class DenseHead:
    """A per-step ``Dense`` (or ``TimeDistributed(Dense)``) after the recurrent stack."""

    name: str
    kernel: np.ndarray
    bias: np.ndarray | None
    activation: str = "linear"

    @property
    def units(self) -> int:
        return int(self.kernel.shape[1])


@dataclass(frozen=True)
class Source:
    """Where a spec came from, for ``/v1/model`` and logs."""

    path: str
    format: str
    conversion: str
    keras_version: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Embedding -> GRU stack -> optional per-step Dense head."""

    name: str
    embeddings: np.ndarray
    layers: tuple[RecurrentLayer, ...]
    head: DenseHead | None
    source: Source
    mask_zero: bool = False
    notes: tuple[str, ...] = field(default=())

    @property
    def vocab_size(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def embedding_width(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def hidden_width(self) -> int:
        return self.layers[-1].output_width

    @property
    def output_width(self) -> int:
        return self.head.units if self.head else self.hidden_width

    def validate(self) -> ModelSpec:
        """Check every shape against its neighbours; raise :class:`ModelError` naming the layer."""
        if self.embeddings.ndim != 2:
            raise ModelError(f"embedding: expected a 2-D matrix, got shape {self.embeddings.shape}")
        if not self.layers:
            raise ModelError("the model has no GRU layer")
        width = self.embedding_width
        for layer in self.layers:
            if layer.merge_mode not in MERGE_MODES:
                raise ModelError(f"{layer.name}: unsupported merge_mode {layer.merge_mode!r}")
            for direction, weights in zip(("forward", "backward"), layer.directions()):
                weights.validate(f"{layer.name} ({direction})", width)
            if layer.backward is not None and layer.backward.units != layer.forward.units:
                raise ModelError(f"{layer.name}: forward and backward have different units")
            width = layer.output_width
        if self.head is not None:
            self._validate_head(width)
        return self

    def _validate_head(self, width: int) -> None:
        head = self.head
        assert head is not None
        if head.kernel.ndim != 2 or head.kernel.shape[0] != width:
            raise ModelError(
                f"{head.name}: kernel has shape {head.kernel.shape}, expected ({width}, units)"
            )
        if head.bias is not None and head.bias.shape != (head.units,):
            raise ModelError(f"{head.name}: bias has shape {head.bias.shape}, expected ({head.units},)")
        if head.activation not in ACTIVATIONS:
            raise ModelError(f"{head.name}: unsupported activation {head.activation!r}")

    def describe(self) -> dict:
        """A JSON-ready summary of the architecture."""
        return {
            "embedding": {"vocab_size": self.vocab_size, "width": self.embedding_width,
                          "mask_zero": self.mask_zero},
            "recurrent": [
                {"name": layer.name, "type": "GRU", "units": layer.units,
                 "bidirectional": layer.bidirectional,
                 "merge_mode": layer.merge_mode if layer.bidirectional else None,
                 "output_width": layer.output_width}
                for layer in self.layers
            ],
            "head": None if self.head is None else {
                "name": self.head.name, "units": self.head.units,
                "activation": self.head.activation, "use_bias": self.head.bias is not None,
            },
            "output_width": self.output_width,
            "hidden_width": self.hidden_width,
        }
