"""The layer plan: what a file's architecture says, before any weight is read.

A reader turns a file's description (Keras ``model_config``, layer names, an architecture
file) into a short list of steps; :func:`assemble` then fills each step with weights from
a :class:`WeightSource` and produces the :class:`~app.spec.ModelSpec`.

A plan is ``[Embedding | Masking]`` -> one or more recurrent (GRU or LSTM) layers -> zero or
more Dense layers. Without an ``Embedding`` the model takes feature vectors, as wide as the
first recurrent layer's kernel. Which cell a layer is, the weights' shapes tell (a
``recurrent_kernel (U, 3U)`` or ``(U, 4U)``); an architecture that names another is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from app.errors import ModelError
from app.formats.layouts import CellRead, float32
from app.spec import (
    CUDNN,
    CUDNN_LSTM,
    CellVariant,
    DenseLayer,
    FeatureInput,
    GRUVariant,
    LSTMVariant,
    ModelInput,
    ModelSpec,
    RecurrentLayer,
    Source,
    TokenInput,
)


@dataclass(frozen=True)
class EmbeddingStep:
    name: str
    mask_zero: bool = False


@dataclass(frozen=True)
class MaskingStep:
    """A ``Masking`` layer before the GRU stack of a feature-vector model."""

    name: str
    mask_value: float = 0.0


@dataclass(frozen=True)
class RecurrentStep:
    """A GRU or LSTM layer. ``merge_mode`` None means unidirectional.

    For a Keras ``Bidirectional`` both directions live under ``name``; for a manual pair
    (two layers, one fed reversed input) the backward weights live under ``backward_name``.
    ``claims_cudnn`` is True when the architecture names ``CuDNNGRU`` / ``CuDNNLSTM``.
    ``variant`` is what the architecture says (None: not said, as in a weights-only file;
    then the weights tell the cell and a GRU's ``reset_after``, and ``activations``, per
    cell, the rest).
    """

    name: str
    merge_mode: str | None = None
    backward_name: str | None = None
    claims_cudnn: bool | None = None
    variant: CellVariant | None = None
    # cell -> (recurrent_activation, activation): hints for weights that don't store them
    activations: Mapping[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class DenseStep:
    name: str
    activation: str = "linear"


Step = EmbeddingStep | MaskingStep | RecurrentStep | DenseStep


class WeightSource(Protocol):
    """Reads one direction of a GRU or LSTM, an embedding matrix, or a Dense layer from a file."""

    def embeddings(self, name: str) -> np.ndarray: ...

    def recurrent(self, name: str, direction: str | None, claims_cudnn: bool | None) -> CellRead: ...

    def dense(self, name: str) -> tuple[np.ndarray, np.ndarray | None]: ...


def check_order(steps: list[Step]) -> None:
    """``[Embedding | Masking]`` first, then one or more GRU / LSTM layers, then Dense layers."""
    kinds = " -> ".join(type(step).__name__.removesuffix("Step") for step in steps)
    body = steps[1:] if steps and isinstance(steps[0], EmbeddingStep | MaskingStep) else steps
    recurrent = 0
    while recurrent < len(body) and isinstance(body[recurrent], RecurrentStep):
        recurrent += 1
    if not recurrent or not all(isinstance(step, DenseStep) for step in body[recurrent:]):
        raise ModelError(
            "expected [Embedding | Masking] -> one or more (Bidirectional) GRU or LSTM layers -> "
            f"optional Dense layers; found {kinds or 'no layers'}"
        )


def assemble(name: str, steps: list[Step], weights: WeightSource, source: Source) -> ModelSpec:
    """Fill the plan with converted weights and validate every shape."""
    check_order(steps)
    layers: list[RecurrentLayer] = []
    conversions: set[str] = set()
    dense: list[DenseLayer] = []
    for step in steps:
        if isinstance(step, RecurrentStep):
            layer, applied = _recurrent_layer(step, weights)
            layers.append(layer)
            conversions.update(applied)
        elif isinstance(step, DenseStep):
            kernel, bias = weights.dense(step.name)
            dense.append(DenseLayer(step.name, float32(kernel), None if bias is None else float32(bias),
                                    step.activation))
    conversion = ", ".join(sorted(conversions)) if source.conversion == "auto" else source.conversion
    spec = ModelSpec(
        name=name,
        input=_input(steps[0], weights, layers[0]),
        layers=tuple(layers),
        dense=tuple(dense),
        source=Source(source.path, source.format, conversion, source.keras_version),
    )
    return spec.validate()


def _input(first: Step, weights: WeightSource, layer: RecurrentLayer) -> ModelInput:
    if isinstance(first, EmbeddingStep):
        return TokenInput(float32(weights.embeddings(first.name)), first.mask_zero)
    mask_value = first.mask_value if isinstance(first, MaskingStep) else None
    return FeatureInput(layer.forward.input_width, mask_value)


def _recurrent_layer(step: RecurrentStep, weights: WeightSource) -> tuple[RecurrentLayer, set[str]]:
    if step.merge_mode is None:
        reads = [weights.recurrent(step.name, None, step.claims_cudnn)]
        label = step.name
    elif step.backward_name is None:
        reads = [weights.recurrent(step.name, d, step.claims_cudnn) for d in ("forward", "backward")]
        label = step.name
    else:
        reads = [weights.recurrent(n, None, step.claims_cudnn) for n in (step.name, step.backward_name)]
        label = f"{step.name}+{step.backward_name}"
    cells = {read.cell for read in reads}
    if len(cells) != 1:
        raise ModelError(f"layer {label!r}: its directions are different cells ({sorted(cells)})")
    cell, cudnn = cells.pop(), any(read.cudnn for read in reads)
    if step.variant is not None and step.variant.cell != cell:
        raise ModelError(f"layer {label!r}: the architecture says {step.variant.cell}, "
                         f"but its weights are {cell} weights")
    variant = _lstm_variant(step, label, cudnn) if cell == "LSTM" else \
        _gru_variant(step, label, {read.reset_after for read in reads}, cudnn)
    layer = RecurrentLayer(label, reads[0].weights, reads[1].weights if len(reads) > 1 else None,
                           step.merge_mode or "concat", variant)  # type: ignore[arg-type]
    return layer, {read.conversion for read in reads}


def _gru_variant(step: RecurrentStep, label: str, reset_after: set[bool], cudnn: bool) -> GRUVariant:
    """The variant the architecture says, checked against the one the weights tell.

    cuDNN-layout weights always run cuDNN's equations: an architecture saying otherwise is
    a contradiction, not a variant."""
    if len(reset_after) != 1:
        raise ModelError(f"layer {label!r}: its directions have different bias layouts")
    if cudnn:
        if step.variant not in (None, CUDNN):
            raise ModelError(f"layer {label!r}: its weights are cuDNN's layout, which always runs "
                             f"cuDNN's GRU, but the architecture says {step.variant}")
        return CUDNN
    from_weights = reset_after.pop()
    if step.variant is not None:
        if step.variant.reset_after != from_weights:
            raise ModelError(
                f"layer {label!r}: the architecture says reset_after={step.variant.reset_after}, "
                f"but its bias has the layout of reset_after={from_weights}")
        return step.variant
    if "GRU" in step.activations:
        return GRUVariant(from_weights, *step.activations["GRU"])
    if not from_weights:
        raise ModelError(
            f"layer {label!r}: its bias (3*units,) is GRU(reset_after=False), whose activations "
            'the file does not store; name them in the architecture file, e.g. "gru": '
            '{"recurrent_activation": "hard_sigmoid", "activation": "tanh"} (Keras 2\'s defaults)')
    return CUDNN


def _lstm_variant(step: RecurrentStep, label: str, cudnn: bool) -> LSTMVariant:
    """As :func:`_gru_variant`, for an LSTM: cuDNN's layout is always cuDNN's LSTM; a Keras
    ``LSTM`` without a description (a weights-only file) needs its activations named, as
    Keras 2's default (hard_sigmoid) and tf.keras 2's (sigmoid) differ."""
    if cudnn:
        if step.variant not in (None, CUDNN_LSTM):
            raise ModelError(f"layer {label!r}: its weights are cuDNN's layout, which always runs "
                             f"cuDNN's LSTM, but the architecture says {step.variant}")
        return CUDNN_LSTM
    if isinstance(step.variant, LSTMVariant):
        return step.variant
    if "LSTM" in step.activations:
        return LSTMVariant(*step.activations["LSTM"])
    raise ModelError(
        f"layer {label!r}: its bias (4*units,) is a Keras LSTM, whose activations the file does "
        'not store; name them in the architecture file, e.g. "lstm": {"recurrent_activation": '
        '"hard_sigmoid"} (Keras 2\'s default) or {"recurrent_activation": "sigmoid"} (tf.keras 2\'s)')
