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

    PyTorch: module prefixes (``emb`` for ``emb.weight``, ``gru`` for ``gru.weight_ih_l0``).
    TF 1.x checkpoints: the embedding variable's name and the head's variable scope.
    """

    embedding: str | None = None
    gru: str | None = None
    head: str | None = None


class Architecture(_Strict):
    merge_mode: Literal["concat", "sum", "ave", "mul"] = "concat"
    head_activation: Literal["linear", "softmax", "sigmoid", "tanh", "relu"] = "linear"
    directions: dict[str, Literal["forward", "backward"]] = Field(
        default_factory=dict,
        description="manual bidirectional pairs: GRU layer name -> direction",
    )
    tensors: TensorPrefixes | None = None
    checkpoint_scope: str | None = Field(
        default=None, description="TF 1.x checkpoints: the variable scope above the cells")


class Parity(_Strict):
    """Sequences with outputs recorded on the GPU, checked at start-up."""

    file: str
    outputs: str = "outputs"
    hidden: str | None = None
    ids: str = "ids"
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
