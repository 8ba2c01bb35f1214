"""Converted weights for other runtimes: ONNX, TensorFlow SavedModel, and a plain ``.npz``.

The ``.npz`` layout (what a C++ engine reads; every array float32, row-major):

- ``embeddings (V, D)`` for a token model (``meta.input.kind == "tokens"``); a feature model
  (``"features"``) has none and its GRU reads the ``(steps, F)`` vectors directly.
- ``layer{i}.forward.kernel (I, 3U)``, ``layer{i}.forward.recurrent_kernel (U, 3U)``,
  ``layer{i}.forward.bias (2, 3U)``, and ``layer{i}.backward.*`` for bidirectional layers
  (a GRU: ``meta.recurrent[i].type == "GRU"``; ``meta.layout`` stays ``"keras-gru"``);
  column blocks are the gates z, r, h; bias row 0 is the input bias, row 1 the recurrent one.
  One step, with ``f`` = ``meta.recurrent[i].recurrent_activation``, ``g`` = ``.activation``
  (``hard_sigmoid`` is Keras 2's ``clip(0.2 x + 0.5, 0, 1)``; the others in app/spec.py)::

      x_z, x_r, x_h = x @ kernel + bias[0];  m_z, m_r, m_h = h @ recurrent_kernel + bias[1]
      z = f(x_z + m_z);  r = f(x_r + m_r)
      hh = g(x_h + r * m_h)                                 if meta.recurrent[i].reset_after
      hh = g(x_h + (r * h) @ recurrent_kernel[:, 2U:])      otherwise (bias[1] is then zeros)
      h' = z * h + (1 - z) * hh

  An LSTM layer (``meta.recurrent[i].type == "LSTM"``; a stack may mix cells) has
  ``kernel (I, 4U)``, ``recurrent_kernel (U, 4U)``, ``bias (4U,)`` (one row: cuDNN's two
  bias vectors summed), column blocks the gates i, f, c, o, and state ``(h, c)`` from zeros::

      z_i, z_f, z_c, z_o = x @ kernel + h @ recurrent_kernel + bias
      i, f_, o = f(z_i), f(z_f), f(z_o);  c' = f_ * c + i * g(z_c);  h' = o * g(c')

  The backward direction runs from each sequence's last step to its first and its outputs
  are put back in order before merging (``meta.recurrent[i].merge_mode``).
- ``dense{j}.kernel (H_j, C_j)``, ``dense{j}.bias (C_j,)`` for each per-step Dense layer in
  order (``meta.dense[j]``): ``x = act_j(x @ kernel + bias)``; the last one's is the output.
- ``meta``: a JSON string with the architecture (:meth:`app.spec.ModelSpec.describe`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from app.spec import ModelSpec, TokenInput

FORMATS = ("onnx", "savedmodel", "npz")


def spec_arrays(spec: ModelSpec) -> dict[str, np.ndarray]:
    arrays = {"embeddings": spec.input.embeddings} if isinstance(spec.input, TokenInput) else {}
    for index, layer in enumerate(spec.layers):
        for direction, weights in zip(("forward", "backward"), layer.directions()):
            prefix = f"layer{index}.{direction}"
            arrays |= {f"{prefix}.kernel": weights.kernel,
                       f"{prefix}.recurrent_kernel": weights.recurrent_kernel,
                       f"{prefix}.bias": weights.bias}
    for index, dense in enumerate(spec.dense):
        arrays[f"dense{index}.kernel"] = dense.kernel
        if dense.bias is not None:
            arrays[f"dense{index}.bias"] = dense.bias
    return arrays


def export_npz(spec: ModelSpec, path: Path) -> Path:
    meta = json.dumps({"name": spec.name, "layout": "keras-gru", **spec.describe()})
    np.savez(path, meta=np.array(meta), **spec_arrays(spec))
    return path


def export_onnx(spec: ModelSpec, path: Path) -> Path:
    import onnx

    from app.lowering.onnx_graph import build_onnx_model

    onnx.save(build_onnx_model(spec), str(path))
    return path


def export_savedmodel(spec: ModelSpec, path: Path) -> Path:
    """A SavedModel whose ``serve`` signature takes ``[inputs, mask bool (B, T)]``: ids
    ``int32 (B, T)`` or features ``float32 (B, T, F)``."""
    from app.lowering.keras_model import build_keras_model

    build_keras_model(spec).export(str(path), format="tf_saved_model", verbose=False)
    return path


def export(spec: ModelSpec, fmt: str, out: Path) -> Path:
    writers = {"onnx": (export_onnx, ".onnx"), "savedmodel": (export_savedmodel, ""),
               "npz": (export_npz, ".npz")}
    writer, suffix = writers[fmt]
    return writer(spec, out if out.suffix or not suffix else out.with_suffix(suffix))
