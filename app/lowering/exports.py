"""Converted weights for other runtimes: ONNX, TensorFlow SavedModel, and a plain ``.npz``.

The ``.npz`` layout (what a C++ engine reads; every array float32, row-major):

- ``embeddings (V, D)``
- ``layer{i}.forward.kernel (I, 3U)``, ``layer{i}.forward.recurrent_kernel (U, 3U)``,
  ``layer{i}.forward.bias (2, 3U)``, and ``layer{i}.backward.*`` for bidirectional layers;
  column blocks are the gates z, r, h; bias row 0 is the input bias, row 1 the recurrent one.
  One step: ``x_z,x_r,x_h = x@kernel + bias[0]``; ``m_z,m_r,m_h = h@recurrent_kernel + bias[1]``;
  ``z = sigmoid(x_z+m_z)``; ``r = sigmoid(x_r+m_r)``; ``hh = tanh(x_h + r*m_h)``;
  ``h' = z*h + (1-z)*hh``. The backward direction runs from each sequence's last token to its
  first and its outputs are put back in order before merging.
- ``head.kernel (H, C)``, ``head.bias (C,)`` when there is a head: ``y = act(x @ kernel + bias)``
- ``meta``: a JSON string with the architecture (units, merge modes, head activation).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.spec import ModelSpec

FORMATS = ("onnx", "savedmodel", "npz")


def spec_arrays(spec: ModelSpec) -> dict[str, np.ndarray]:
    arrays = {"embeddings": spec.embeddings}
    for index, layer in enumerate(spec.layers):
        for direction, weights in zip(("forward", "backward"), layer.directions()):
            prefix = f"layer{index}.{direction}"
            arrays |= {f"{prefix}.kernel": weights.kernel,
                       f"{prefix}.recurrent_kernel": weights.recurrent_kernel,
                       f"{prefix}.bias": weights.bias}
    if spec.head is not None:
        arrays["head.kernel"] = spec.head.kernel
        if spec.head.bias is not None:
            arrays["head.bias"] = spec.head.bias
    return arrays


def export_npz(spec: ModelSpec, path: Path) -> Path:
    meta = json.dumps({"name": spec.name, "layout": "keras3-gru-reset-after", **spec.describe()})
    np.savez(path, meta=np.array(meta), **spec_arrays(spec))
    return path


def export_onnx(spec: ModelSpec, path: Path) -> Path:
    import onnx

    from app.lowering.onnx_graph import build_onnx_model

    onnx.save(build_onnx_model(spec), str(path))
    return path


def export_savedmodel(spec: ModelSpec, path: Path) -> Path:
    """A SavedModel whose ``serve`` signature takes ``(ids int32, mask bool)``, both (B, T)."""
    from app.convert.keras_model import build_keras_model

    build_keras_model(spec).export(str(path), format="tf_saved_model", verbose=False)
    return path


def export(spec: ModelSpec, fmt: str, out: Path) -> Path:
    writers = {"onnx": (export_onnx, ".onnx"), "savedmodel": (export_savedmodel, ""),
               "npz": (export_npz, ".npz")}
    writer, suffix = writers[fmt]
    return writer(spec, out if out.suffix or not suffix else out.with_suffix(suffix))
