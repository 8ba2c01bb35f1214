"""Keras 2 / tf.keras HDF5 files: full models (``model.save``) and weights (``save_weights``).

Layout (``save_weights`` writes the part under ``model_weights/`` at the root)::

    /  @keras_version @backend @model_config (JSON)
    /model_weights  @layer_names=[...]          (may be split: layer_names0, layer_names1, ...)
    /model_weights/<layer>  @weight_names=['<layer>/forward_<cell>/kernel:0', ...]
    /model_weights/<layer>/<weight name>        (datasets; read in @weight_names order)

Attributes may be ``bytes`` or ``str`` depending on the writer.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from app.errors import ModelError
from app.formats.gru_layouts import from_cudnn_gru, from_keras2_file
from app.formats.keras_config import parse_model_config
from app.formats.layouts import CellRead, cell_of
from app.formats.lstm_layouts import from_keras2_lstm_file
from app.formats.manifest import Architecture
from app.formats.plan import DenseStep, EmbeddingStep, MaskingStep, RecurrentStep, Step, assemble
from app.spec import ModelSpec, Source


def read_keras_h5(path: Path, architecture: Architecture, name: str) -> ModelSpec:
    with open_h5(path) as file:
        raw_config = text_attr(file, "model_config")
        weights_root = file.get("model_weights", file)
        source = H5Weights(path, weights_root)
        if raw_config is not None:
            steps = parse_model_config(raw_config, architecture.directions)
            file_format = "keras2-h5-model"
        else:
            steps = plan_from_weights(source, architecture)
            file_format = "keras2-h5-weights"
        keras_version = text_attr(file, "keras_version") or text_attr(weights_root, "keras_version")
        return assemble(name, steps, source, Source(str(path), file_format, "auto", keras_version))


def open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: file not found") from exc
    except OSError as exc:
        raise ModelError(f"{path}: not a readable HDF5 file (truncated or corrupted?): {exc}") from exc


def text_attr(node: h5py.Group, name: str) -> str | None:
    value = node.attrs.get(name)
    if value is None:
        return None
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def list_attr(node: h5py.Group, name: str) -> list[str]:
    """A list attribute, joined back when Keras split it into ``name0, name1, ...``."""
    if name in node.attrs:
        chunks = [node.attrs[name]]
    else:
        chunks, index = [], 0
        while f"{name}{index}" in node.attrs:
            chunks.append(node.attrs[f"{name}{index}"])
            index += 1
    return [item.decode("utf-8") if isinstance(item, bytes) else str(item)
            for chunk in chunks for item in np.atleast_1d(chunk)]


class H5Weights:
    """The :class:`~app.formats.plan.WeightSource` of a Keras HDF5 weights group."""

    def __init__(self, path: Path, root: h5py.Group) -> None:
        self.path = path
        self.root = root

    def layer_names(self) -> list[str]:
        return list_attr(self.root, "layer_names")

    def weight_names(self, layer: str) -> list[str]:
        if layer not in self.root:
            raise ModelError(f"{self.path}: no weights group for layer {layer!r}")
        return list_attr(self.root[layer], "weight_names")

    def _named(self, layer: str, direction: str | None) -> dict[str, np.ndarray]:
        """The layer's arrays (of one direction) by short name; only those datasets are read."""
        group, named = self.root[layer], {}
        for weight_name in self.weight_names(layer):
            parts = weight_name.split("/")
            if direction is not None and not any(p.startswith(f"{direction}_") for p in parts):
                continue
            try:
                named[parts[-1].split(":")[0]] = np.asarray(group[weight_name][()])
            except (KeyError, OSError) as exc:
                raise ModelError(f"{self.path}: dataset {layer}/{weight_name} is missing or unreadable "
                                 f"(truncated file?): {exc}") from exc
        return named

    def embeddings(self, name: str) -> np.ndarray:
        named = self._named(name, None)
        if "embeddings" not in named:
            raise ModelError(f"{self.path}: layer {name!r} has no embeddings dataset")
        return named["embeddings"]

    def recurrent(self, name: str, direction: str | None, claims_cudnn: bool | None) -> CellRead:
        named = self._named(name, direction)
        where = f"layer {name!r}" + (f" ({direction})" if direction else "")
        missing = {"kernel", "recurrent_kernel", "bias"} - named.keys()
        if missing:
            raise ModelError(f"{self.path}: {where} lacks {sorted(missing)}")
        kernel, recurrent, bias = named["kernel"], named["recurrent_kernel"], named["bias"]
        if cell_of(recurrent, where) == "LSTM":
            return from_keras2_lstm_file(kernel, recurrent, bias, where, claims_cudnn)
        if claims_cudnn:
            if bias.ndim != 1:
                raise ModelError(
                    f"{where}: claims CuDNNGRU but its bias has shape {bias.shape}, "
                    "not cuDNN's (6*units,)"
                )
            return CellRead(from_cudnn_gru(kernel, recurrent, bias, where), "cudnn-gru->keras-gru",
                           cudnn=True)
        return from_keras2_file(kernel, recurrent, bias, where)

    def dense(self, name: str) -> tuple[np.ndarray, np.ndarray | None]:
        named = self._named(name, None)
        if "kernel" not in named:
            raise ModelError(f"{self.path}: layer {name!r} has no kernel dataset")
        return named["kernel"], named.get("bias")


def plan_from_weights(source: H5Weights, architecture: Architecture) -> list[Step]:
    """The plan of a weights-only file: layer order from ``layer_names``, roles from names.

    Two GRU (or LSTM) layers named in ``architecture.directions`` form a manual bidirectional
    pair; they must follow each other in ``layer_names``. Without an embedding the model takes
    feature vectors. What weights can't tell (Dense activations, the activations of a
    ``reset_after=False`` GRU or of a Keras LSTM, a Masking value) comes from ``architecture``.
    """
    steps: list[Step] = []
    if architecture.mask_value is not None:
        steps.append(MaskingStep("masking", architecture.mask_value))
    activations = {cell: (hint.recurrent_activation, hint.activation)
                   for cell, hint in (("GRU", architecture.gru), ("LSTM", architecture.lstm)) if hint}
    waiting: str | None = None  # the first half of a manual pair
    for layer in source.layer_names():
        full = source.weight_names(layer)
        short = [name.split("/")[-1].split(":")[0] for name in full]
        direction = architecture.directions.get(layer)
        if short and waiting is not None and not ("recurrent_kernel" in short and direction):
            raise ModelError(f"{source.path}: layer {waiting!r} is marked "
                             f"{architecture.directions[waiting]} but the next layer is not its pair")
        if not short:
            continue
        if short == ["embeddings"]:
            steps.append(EmbeddingStep(layer))
        elif any("/forward_" in n for n in full) and any("/backward_" in n for n in full):
            steps.append(RecurrentStep(layer, architecture.merge_mode, activations=activations))
        elif "recurrent_kernel" in short and direction is None:
            steps.append(RecurrentStep(layer, activations=activations))
        elif "recurrent_kernel" in short and waiting is None:
            waiting = layer
        elif "recurrent_kernel" in short:
            steps.append(_pair(waiting, layer, architecture, activations))  # type: ignore[arg-type]
            waiting = None
        elif "kernel" in short:
            steps.append(DenseStep(layer))
        else:
            raise ModelError(f"{source.path}: cannot tell what layer {layer!r} is from weights {short}")
    if waiting is not None:
        raise ModelError(f"{source.path}: layer {waiting!r} is marked but has no pair")
    return _with_dense_activations(steps, architecture, str(source.path))


def _with_dense_activations(steps: list[Step], architecture: Architecture, where: str) -> list[Step]:
    dense = [step for step in steps if isinstance(step, DenseStep)]
    named = iter(architecture.dense_activations(len(dense), where))
    return [DenseStep(step.name, next(named)) if isinstance(step, DenseStep) else step for step in steps]


def _pair(first: str, second: str, architecture: Architecture,
          activations: dict[str, tuple[str, str]]) -> RecurrentStep:
    if architecture.directions[first] == architecture.directions[second]:
        raise ModelError(f"layers {first!r} and {second!r} are both marked {architecture.directions[first]}")
    forward, backward = (first, second) if architecture.directions[first] == "forward" else (second, first)
    return RecurrentStep(forward, architecture.merge_mode, backward, activations=activations)
