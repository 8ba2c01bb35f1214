"""The layer plan: what a file's architecture says, before any weight is read.

A reader turns a file's description (Keras ``model_config``, layer names, an architecture
file) into a short list of steps; :func:`assemble` then fills each step with weights from
a :class:`WeightSource` and produces the :class:`~app.spec.ModelSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from app.errors import ModelError
from app.formats.gru_layouts import float32
from app.spec import DenseHead, GRUWeights, ModelSpec, RecurrentLayer, Source


@dataclass(frozen=True)
class EmbeddingStep:
    name: str
    mask_zero: bool = False


@dataclass(frozen=True)
class RecurrentStep:
    """A GRU layer. ``merge_mode`` None means unidirectional.

    For a Keras ``Bidirectional`` both directions live under ``name``; for a manual pair
    (two layers, one fed reversed input) the backward weights live under ``backward_name``.
    ``claims_cudnn`` is True when the architecture names ``CuDNNGRU``.
    """

    name: str
    merge_mode: str | None = None
    backward_name: str | None = None
    claims_cudnn: bool | None = None


@dataclass(frozen=True)
class HeadStep:
    name: str
    activation: str = "linear"


Step = EmbeddingStep | RecurrentStep | HeadStep


class WeightSource(Protocol):
    """Reads one direction of a GRU, an embedding matrix, or a Dense head from a file."""

    def embeddings(self, name: str) -> np.ndarray: ...

    def gru(self, name: str, direction: str | None, claims_cudnn: bool | None
            ) -> tuple[GRUWeights, str]: ...

    def dense(self, name: str) -> tuple[np.ndarray, np.ndarray | None]: ...


def check_order(steps: list[Step]) -> None:
    """Embedding first, then one or more GRU layers, then at most one head."""
    kinds = [type(step).__name__ for step in steps]
    if not steps or not isinstance(steps[0], EmbeddingStep):
        raise ModelError(f"the model must start with an Embedding layer; found {kinds}")
    body = steps[1:]
    if body and isinstance(body[-1], HeadStep):
        body = body[:-1]
    if not body or not all(isinstance(step, RecurrentStep) for step in body):
        raise ModelError(
            "expected Embedding -> one or more (Bidirectional) GRU layers -> optional Dense head; "
            f"found {' -> '.join(kinds)}"
        )


def assemble(name: str, steps: list[Step], weights: WeightSource, source: Source) -> ModelSpec:
    """Fill the plan with converted weights and validate every shape."""
    check_order(steps)
    embedding = steps[0]
    assert isinstance(embedding, EmbeddingStep)
    layers: list[RecurrentLayer] = []
    conversions: set[str] = set()
    head: DenseHead | None = None
    for step in steps[1:]:
        if isinstance(step, RecurrentStep):
            layer, applied = _recurrent_layer(step, weights)
            layers.append(layer)
            conversions.update(applied)
        elif isinstance(step, HeadStep):
            kernel, bias = weights.dense(step.name)
            head = DenseHead(step.name, float32(kernel), None if bias is None else float32(bias),
                             step.activation)
    conversion = ", ".join(sorted(conversions)) if source.conversion == "auto" else source.conversion
    spec = ModelSpec(
        name=name,
        embeddings=float32(weights.embeddings(embedding.name)),
        layers=tuple(layers),
        head=head,
        source=Source(source.path, source.format, conversion, source.keras_version),
        mask_zero=embedding.mask_zero,
    )
    return spec.validate()


def _recurrent_layer(step: RecurrentStep, weights: WeightSource) -> tuple[RecurrentLayer, set[str]]:
    if step.merge_mode is None:
        forward, applied = weights.gru(step.name, None, step.claims_cudnn)
        return RecurrentLayer(step.name, forward), {applied}
    if step.backward_name is None:
        forward, fwd_applied = weights.gru(step.name, "forward", step.claims_cudnn)
        backward, bwd_applied = weights.gru(step.name, "backward", step.claims_cudnn)
        label = step.name
    else:
        forward, fwd_applied = weights.gru(step.name, None, step.claims_cudnn)
        backward, bwd_applied = weights.gru(step.backward_name, None, step.claims_cudnn)
        label = f"{step.name}+{step.backward_name}"
    layer = RecurrentLayer(label, forward, backward, step.merge_mode)  # type: ignore[arg-type]
    return layer, {fwd_applied, bwd_applied}
