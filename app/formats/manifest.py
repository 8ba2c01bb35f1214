"""The model directory's ``model.json``: which file holds the model, and what the file can't say.

A full-model Keras ``.h5`` describes itself; a weights-only ``.h5`` or a PyTorch state_dict
does not, so ``architecture`` fills in only what shapes cannot tell (merge mode, head
activation, which tensors are which). Everything else is inferred from the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import ModelError

MANIFEST_NAME = "model.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorPrefixes(_Strict):
    """Which tensors are which, where names don't tell (unset: inferred from shapes).

    PyTorch: module prefixes (``emb`` for ``emb.weight``, ``gru`` for ``gru.weight_ih_l0``: the
    ``nn.GRU`` or ``nn.LSTM``).
    TF 1.x checkpoints: the embedding variable's name and the head's variable scope.
    """

    embedding: str | None = None
    gru: str | None = None
    head: str | list[str] | None = Field(
        default=None, description="the Dense layer, or the Dense layers of a stack in order")


DenseActivation = Literal["linear", "softmax", "sigmoid", "tanh", "relu"]
GRUActivation = Literal["sigmoid", "hard_sigmoid", "tanh", "relu", "linear", "softsign", "softplus",
                        "elu"]


class GRUActivations(_Strict):
    """The activations of every GRU layer of a file that doesn't store them (``hard_sigmoid``
    is Keras 2's ``clip(0.2 x + 0.5, 0, 1)``); ``reset_after`` is told by the bias shape."""

    recurrent_activation: GRUActivation
    activation: GRUActivation = "tanh"


class LSTMActivations(GRUActivations):
    """The activations of every Keras ``LSTM`` layer of a weights-only file (Keras 2's default
    recurrent activation was ``hard_sigmoid``, tf.keras 2's is ``sigmoid``); a ``CuDNNLSTM``'s
    ``(8U,)`` bias is always cuDNN's sigmoid / tanh and needs none."""


class Architecture(_Strict):
    merge_mode: Literal["concat", "sum", "ave", "mul"] = "concat"
    head_activation: DenseActivation = Field(
        "linear", description="the activation of the Dense layer when there is one")
    head_activations: list[DenseActivation] | None = Field(
        default=None, description="one activation per Dense layer, in order (a stack)")
    gru: GRUActivations | None = Field(
        default=None, description="weights-only Keras files: the GRU layers' activations")
    lstm: LSTMActivations | None = Field(
        default=None, description="weights-only Keras files: the LSTM layers' activations")
    input: Literal["tokens", "features"] | None = Field(
        default=None, description="PyTorch / TF 1.x: token ids through an embedding, or feature "
        "vectors (no embedding); default: tokens when an embedding tensor is found")
    mask_value: float | None = Field(
        default=None, description="feature models of a weights-only file that had a Masking layer")
    directions: dict[str, Literal["forward", "backward"]] = Field(
        default_factory=dict,
        description="manual bidirectional pairs: GRU layer name -> direction",
    )
    tensors: TensorPrefixes | None = None
    checkpoint_scope: str | None = Field(
        default=None, description="TF 1.x checkpoints: the variable scope above the cells")

    def dense_activations(self, count: int, where: str) -> list[str]:
        """The activations of ``count`` Dense layers that the file itself doesn't name."""
        if self.head_activations is not None:
            if len(self.head_activations) != count:
                raise ModelError(f"{where}: {count} Dense layers, but the architecture file's "
                                 f"head_activations names {len(self.head_activations)}")
            return list(self.head_activations)
        if count > 1:
            raise ModelError(f"{where}: {count} Dense layers; name each one's activation in the "
                             'architecture file, e.g. "head_activations": ["relu", "softmax"]')
        return [self.head_activation] * count


class Parity(_Strict):
    """Sequences with outputs recorded on the GPU, checked at start-up."""

    file: str
    outputs: str = "outputs"
    hidden: str | None = None
    ids: str = Field("ids", description="the concatenated inputs: ids (N,), or features (N, F)")
    lengths: str = "lengths"
    tolerance: float | None = Field(default=None, gt=0)


class KerasCheck(_Strict):
    """The Keras model against the parity data (GPU outputs), as measured by `convert`."""

    sequences: int
    max_abs_diff_outputs: float
    max_abs_diff_hidden: float | None = None
    reference: str


class KerasRecord(_Strict):
    """Written by `convert` next to ``model.keras``: what Keras itself said about the model."""

    keras_version: str | None = None
    check: KerasCheck | None = Field(default=None, description="None when there is no parity data")
    outputs: Parity = Field(description="the Keras model's own outputs on the check sequences; "
                            "the serving engine must reproduce them")
    conversion: dict[str, float] = Field(default_factory=dict, description="seconds, peak_rss_mib")


class Manifest(_Strict):
    name: str | None = None
    artifact: str
    converted_from: dict[str, str | None] | None = Field(
        default=None, description="written by `convert`: the original file, format and conversion")
    keras: KerasRecord | None = Field(default=None, description="written by `convert`")
    architecture: Architecture = Field(default_factory=Architecture)
    vocabulary: str | None = None
    parity: Parity | None = None


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST_NAME
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise ModelError(f"{directory}: a model directory needs a {MANIFEST_NAME}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ModelError(f"{path}: {problems}") from exc
