"""Keras 3 ``.keras`` archives: ``config.json`` + ``model.weights.h5`` in a zip.

Read with zipfile, json and h5py: no Keras import and nothing deserialised as code. This is
also the format ``python -m app convert`` writes, already in the Keras 3 layout, so serving
it needs no conversion. In ``model.weights.h5`` each layer is a group under ``layers/``
whose ``vars`` group is named by its ``name`` attribute; a GRU's or LSTM's weights sit in
``cell/vars/{0,1,2}`` (``forward_layer/`` and ``backward_layer/`` in a ``Bidirectional``),
already in the spec's layout; the recurrent kernel's shape tells the cell.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import h5py
import numpy as np

from app.errors import ModelError
from app.formats.gru_layouts import from_keras_gru
from app.formats.keras_config import parse_model_config
from app.formats.layouts import CellRead, cell_of
from app.formats.lstm_layouts import from_keras_lstm
from app.formats.manifest import Architecture
from app.formats.plan import assemble
from app.spec import ModelSpec, Source


def read_keras3(path: Path, architecture: Architecture, name: str) -> ModelSpec:
    try:
        with zipfile.ZipFile(path) as archive:
            config = archive.read("config.json")
            names = archive.namelist()
            metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
            weights = io.BytesIO(archive.read("model.weights.h5"))
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: file not found") from exc
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
        raise ModelError(f"{path}: not a readable .keras archive (truncated?): {exc}") from exc
    steps = parse_model_config(config, architecture.directions, keras3=True)
    with h5py.File(weights, "r") as file:
        source = Keras3Weights(path, file)
        return assemble(name, steps, source, Source(str(path), "keras3", "none (Keras 3 layout)",
                                                    metadata.get("keras_version")))


class Keras3Weights:
    """The :class:`~app.formats.plan.WeightSource` of a Keras 3 weights file."""

    def __init__(self, path: Path, file: h5py.File) -> None:
        self.path = path
        self.groups: dict[str, h5py.Group] = {}
        for group in file.get("layers", {}).values():
            if "vars" in group:
                self.groups[_text(group["vars"].attrs.get("name", ""))] = group

    def _group(self, name: str) -> h5py.Group:
        if name not in self.groups:
            raise ModelError(f"{self.path}: no weights for layer {name!r}")
        return self.groups[name]

    def _arrays(self, group: h5py.Group) -> list[np.ndarray]:
        """The layer's variables in order: its own ``vars``, else its first child's that has some."""
        own = group.get("vars")
        if own is not None and len(own):
            return [np.asarray(own[str(i)][()], dtype=np.float32) for i in range(len(own))]
        for key in group:
            if key != "vars" and isinstance(group[key], h5py.Group) and (found := self._arrays(group[key])):
                return found
        return []

    def embeddings(self, name: str) -> np.ndarray:
        return self._arrays(self._group(name))[0]

    def recurrent(self, name: str, direction: str | None, claims_cudnn: bool | None) -> CellRead:
        group = self._group(name)
        if direction is not None:
            group = group[f"{direction}_layer"]
        arrays = self._arrays(group)
        if len(arrays) != 3:
            raise ModelError(f"{self.path}: layer {name!r} has {len(arrays)} recurrent variables, "
                             "expected 3")
        where = f"layer {name!r}" + (f" ({direction})" if direction else "")
        if cell_of(arrays[1], where) == "LSTM":
            return CellRead(from_keras_lstm(*arrays, where), "none (Keras 3 layout)")
        weights, reset_after = from_keras_gru(*arrays, where)
        return CellRead(weights, "none (Keras 3 layout)", reset_after)

    def dense(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        arrays = self._arrays(self._group(name))
        return arrays[0], arrays[1] if len(arrays) > 1 else None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
