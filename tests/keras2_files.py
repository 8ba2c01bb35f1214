"""Writes Keras 2-style HDF5 files (``model.save`` / ``save_weights`` layout) with h5py.

Only what the legacy format holds: ``model_config`` JSON, ``layer_names``, and per-layer
``weight_names`` with their datasets. Used to test layouts the shared fixtures don't cover.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from tests.reference import (
    Native,
    NativeModel,
    Variant,
    to_cudnngru,
    to_cudnnlstm,
    to_keras_gru,
    to_keras_lstm,
)

# Keras 2's class -> the name its weights carry inside a Bidirectional
CELL_NAMES = {"CuDNNGRU": "cu_dnngru", "GRU": "gru_cell", "CuDNNLSTM": "cu_dnnlstm", "LSTM": "lstm_cell"}
Cells = str | tuple[str, ...]  # one class for every layer, or one per layer


def _cell(cells: Cells, index: int) -> str:
    return cells if isinstance(cells, str) else cells[index]


def _gru_config(cell: str, units: int, variant: Variant) -> dict:
    config = {"name": "lstm" if "LSTM" in cell else "gru", "units": units, "return_sequences": True,
              "return_state": False, "go_backwards": False, "stateful": False}
    if cell == "GRU":
        config |= {"activation": variant.activation, "recurrent_activation": variant.recurrent_activation,
                   "reset_after": variant.reset_after, "use_bias": True}
    if cell == "LSTM":
        config |= {"activation": variant.activation, "recurrent_activation": variant.recurrent_activation,
                   "use_bias": True, "unit_forget_bias": True}
    return {"class_name": cell, "config": config}


def model_config(model: NativeModel, cell: Cells = "CuDNNGRU") -> dict:
    if model.embeddings is None:
        width = model.layers[0][0].width
        layers: list[dict] = [{"class_name": "InputLayer", "config": {
            "batch_input_shape": [None, None, width], "name": "features"}}]
    else:
        vocab, width = model.embeddings.shape
        layers = [
            {"class_name": "InputLayer", "config": {"batch_input_shape": [None, None], "name": "ids"}},
            {"class_name": "Embedding", "config": {"name": "embedding", "input_dim": vocab,
                                                   "output_dim": width, "mask_zero": False}},
        ]
    for index, (forward, backward) in enumerate(model.layers):
        inner = _gru_config(_cell(cell, index), forward.units, model.layer_variant(index))
        if backward is None:
            layers.append({"class_name": _cell(cell, index),
                           "config": inner["config"] | {"name": f"gru_{index}"}})
        else:
            layers.append({"class_name": "Bidirectional", "config": {
                "name": f"bigru_{index}", "layer": inner, "merge_mode": model.layer_merge(index)}})
    for index, (kernel, _, name) in enumerate(model.stack):
        layers.append({"class_name": "Dense", "config": {"name": f"dense_{index}",
                                                         "units": kernel.shape[1], "activation": name}})
        layers.append({"class_name": "Dropout", "config": {"name": f"dropout_{index}", "rate": 0.5}})
    if model.head_kernel is not None:
        dense = {"class_name": "Dense", "config": {"name": "dense", "units": model.head_kernel.shape[1],
                                                   "activation": model.head_activation}}
        layers.append({"class_name": "TimeDistributed", "config": {"name": "head", "layer": dense}})
    return {"class_name": "Sequential", "config": {"name": "sequential", "layers": layers}}


LayerWeights = list[tuple[str, list[tuple[str, np.ndarray]]]]


def layer_weights(model: NativeModel, cell: Cells = "CuDNNGRU") -> LayerWeights:
    def encode(native: Native, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return {"CuDNNGRU": to_cudnngru, "CuDNNLSTM": to_cudnnlstm, "LSTM": to_keras_lstm,
                "GRU": lambda n: to_keras_gru(n, model.layer_variant(index).reset_after),
                }[_cell(cell, index)](native)

    result: LayerWeights = []
    if model.embeddings is not None:
        result.append(("embedding", [("embedding/embeddings:0", model.embeddings)]))
    for index, (forward, backward) in enumerate(model.layers):
        cell_name = CELL_NAMES[_cell(cell, index)]
        if backward is None:
            name = f"gru_{index}"
            result.append((name, [(f"{name}/{w}:0", a) for w, a in
                                  zip(("kernel", "recurrent_kernel", "bias"), encode(forward, index))]))
            continue
        name = f"bigru_{index}"
        weights = []
        for direction, native in (("forward", forward), ("backward", backward)):
            weights += [(f"{name}/{direction}_{cell_name}/{w}:0", a)
                        for w, a in zip(("kernel", "recurrent_kernel", "bias"), encode(native, index))]
        result.append((name, weights))
    for index, (kernel, bias, _) in enumerate(model.stack):
        name = f"dense_{index}"
        result.append((name, [(f"{name}/kernel:0", kernel), (f"{name}/bias:0", bias)]))
    if model.head_kernel is not None:
        result.append(("head", [("head/kernel:0", model.head_kernel), ("head/bias:0", model.head_bias)]))
    return result


def _write_weights(group: h5py.Group, layers: LayerWeights) -> None:
    group.attrs["layer_names"] = np.array([name.encode() for name, _ in layers])
    group.attrs["backend"] = b"tensorflow"
    group.attrs["keras_version"] = b"2.2.4"
    for name, weights in layers:
        layer_group = group.create_group(name)
        layer_group.attrs["weight_names"] = np.array([w.encode() for w, _ in weights])
        for weight_name, array in weights:
            layer_group.create_dataset(weight_name, data=array)


def write_full_model(path: Path, model: NativeModel, cell: Cells = "CuDNNGRU",
                     config: dict | None = None) -> Path:
    with h5py.File(path, "w") as file:
        file.attrs["keras_version"] = b"2.2.4"
        file.attrs["backend"] = b"tensorflow"
        file.attrs["model_config"] = json.dumps(config or model_config(model, cell)).encode()
        _write_weights(file.create_group("model_weights"), layer_weights(model, cell))
    return path


def write_weights_only(path: Path, model: NativeModel, cell: Cells = "CuDNNGRU") -> Path:
    with h5py.File(path, "w") as file:
        _write_weights(file, layer_weights(model, cell))
    return path
