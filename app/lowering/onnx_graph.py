"""Builds an ONNX graph from a :class:`~app.spec.ModelSpec`, for ONNX Runtime and for export.

ONNX's ``GRU`` operator computes every variant of :mod:`app.spec`: ``linear_before_reset=1``
is ``reset_after=True`` (cuDNN's equations), ``0`` is ``reset_after=False`` (Keras 2's
default; its recurrent h bias adds outside the reset product, as the spec's zero row 1
needs), and its ``activations`` ``[f, g]`` per direction are the recurrent activation and the
activation (:data:`GRU_ACTIVATION_OPS`; Keras 2's hard_sigmoid is ``HardSigmoid`` with alpha
0.2, beta 0.5). Its layout: ``W (dirs, 3U, I)``, ``R (dirs, 3U, U)``, ``B (dirs, 6U)``,
gates z, r, h: the Keras kernels transposed, the two bias rows concatenated. Its
``sequence_lens`` input makes the reverse direction start at each sequence's last real step
and zeroes the steps past it, so a right-padded batch gives every sequence exactly its own
numbers. (The activation attributes were checked against a NumPy GRU for every pair of
these activations and both forms, on ONNX Runtime's CPU kernel.)

``build_onnx_model(spec, backward="reversed")`` lowers the backward direction instead as a
forward ``GRU`` over each sequence reversed in place (``ReverseSequence`` by its length),
reversed back afterwards: the same numbers, and every ``GRU`` a plain forward one without
``sequence_lens`` — the form OpenVINO's CPU plugin runs as one fused oneDNN RNN (with
``sequence_lens`` it unrolls the loop, and gets padded batches wrong). Steps past a
sequence's length then hold padding's outputs instead of zeros; callers ignore them.

ONNX's ``LSTM`` operator computes the spec's LSTM: ``W (dirs, 4U, I)``, ``R (dirs, 4U, U)``
in gate order i, o, f, c (the Keras i, f, c, o blocks reordered and transposed), ``B (dirs,
8U)`` = ``[Wb | Rb]``: the spec's one bias row in ``Wb`` and zeros in ``Rb`` (both add outside
every product, so the sum is exact). Its ``activations`` ``[f, g, h]`` per direction are
the recurrent activation (gates i, f, o), the activation (candidate c) and the activation
again (the output's ``g(c')``); no peepholes (``P`` absent). ``sequence_lens`` and the
``reversed`` lowering work as for the GRU; a stack may mix the two ops.

Inputs: ``ids (batch, steps) int32`` or ``features (batch, steps, F) float32`` (the spec's
input name), and ``lengths (batch,) int32``.
Outputs: ``outputs (batch, steps, C)`` and ``hidden (batch, steps, H)``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.spec import CellVariant, CellWeights, DenseLayer, GRUVariant, ModelSpec, RecurrentLayer, TokenInput

OPSET = 18
IR_VERSION = 10  # what ONNX Runtime 1.2x reads; opset 18 needs IR >= 8
ACTIVATION_OPS = {"softmax": "Softmax", "sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
MERGE_REDUCERS = {"sum": "ReduceSum", "ave": "ReduceMean", "mul": "ReduceProd"}
# spec name -> (ONNX RNN activation, its alpha, its beta); None: the function takes none.
GRU_ACTIVATION_OPS: dict[str, tuple[str, float | None, float | None]] = {
    "sigmoid": ("Sigmoid", None, None),
    "hard_sigmoid": ("HardSigmoid", 0.2, 0.5),
    "tanh": ("Tanh", None, None),
    "relu": ("Relu", None, None),
    "linear": ("Affine", 1.0, 0.0),
    "softsign": ("Softsign", None, None),
    "softplus": ("Softplus", None, None),
    "elu": ("Elu", 1.0, None),
}
LSTM_GATE_ORDER = (0, 3, 1, 2)  # Keras' i, f, c, o blocks taken in ONNX's order i, o, f, c


class _Graph:
    """Collects nodes and initializers, handing out unique tensor names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: object) -> str:
        self._count += 1
        output = output or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output


Backward = Literal["sequence_lens", "reversed"]


def build_onnx_model(spec: ModelSpec, backward: Backward = "sequence_lens") -> onnx.ModelProto:
    graph = _Graph()
    recurrent = _recurrent if backward == "sequence_lens" else _recurrent_reversed
    if isinstance(spec.input, TokenInput):
        steps = graph.op("Gather", [graph.const("embeddings", spec.input.embeddings), spec.input.name])
        input_info = helper.make_tensor_value_info(spec.input.name, TensorProto.INT32, ["batch", "steps"])
    else:
        steps = spec.input.name
        input_info = helper.make_tensor_value_info(spec.input.name, TensorProto.FLOAT,
                                                   ["batch", "steps", spec.input.features])
    x = graph.op("Transpose", [steps], perm=[1, 0, 2])  # time-major for the GRU / LSTM ops
    for index, layer in enumerate(spec.layers):
        x = recurrent(graph, layer, index, x)
    hidden = graph.op("Transpose", [x], "hidden", perm=[1, 0, 2])
    x = hidden
    for index, dense in enumerate(spec.dense):
        x = _dense(graph, dense, index, x, "outputs" if index == len(spec.dense) - 1 else None)
    if not spec.dense:
        graph.op("Identity", [hidden], "outputs")
    inputs = [input_info, helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"])]
    outputs = [
        helper.make_tensor_value_info("outputs", TensorProto.FLOAT, ["batch", "steps", spec.output_width]),
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "steps", spec.hidden_width]),
    ]
    onnx_graph = helper.make_graph(graph.nodes, spec.name, inputs, outputs, graph.initializers)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="bigru-serve")
    onnx.checker.check_model(model)
    return model


def _recurrent(graph: _Graph, layer: RecurrentLayer, index: int, x: str) -> str:
    """One GRU or LSTM layer on ``x (steps, batch, I)``; returns ``(steps, batch, width)``."""
    directions = layer.directions()
    prefix = f"{layer.cell.lower()}{index}"
    w, r, b = _initializers(graph, layer.variant, prefix, directions)
    y = graph.op(
        layer.cell, [x, w, r, b, "lengths"], hidden_size=layer.units,
        direction="bidirectional" if layer.bidirectional else "forward",
        **cell_attributes(layer.variant, len(directions)),
    )  # y: (steps, dirs, batch, U)
    return _merge(graph, layer, prefix, y)


def _recurrent_reversed(graph: _Graph, layer: RecurrentLayer, index: int, x: str) -> str:
    """:func:`_recurrent` with forward-only ``GRU`` / ``LSTM`` ops: the backward one reads
    each sequence reversed by its own length, so padding comes after its real steps, never
    before."""
    prefix = f"{layer.cell.lower()}{index}"
    lengths = graph.op("Cast", ["lengths"], to=TensorProto.INT64)
    dir_axis = graph.const(f"{prefix}_dir_axis", np.array([1], np.int64))
    per_direction = []
    for name, direction in zip(("forward", "backward"), layer.directions()):
        w, r, b = _initializers(graph, layer.variant, f"{prefix}_{name}", [direction])
        inputs = x if name == "forward" else _reverse(graph, x, lengths)
        y = graph.op(layer.cell, [inputs, w, r, b], hidden_size=layer.units,
                     **cell_attributes(layer.variant, 1))
        if name == "backward":  # y: (steps, 1, batch, U)
            steps = _reverse(graph, graph.op("Squeeze", [y, dir_axis]), lengths)
            y = graph.op("Unsqueeze", [steps, dir_axis])
        per_direction.append(y)
    y = graph.op("Concat", per_direction, axis=1) if layer.bidirectional else per_direction[0]
    return _merge(graph, layer, prefix, y)


def _initializers(graph: _Graph, variant: CellVariant, prefix: str,
                  directions: list[CellWeights]) -> tuple[str, str, str]:
    """``W``, ``R``, ``B`` of the op, one row per direction (see the module docstring)."""
    if isinstance(variant, GRUVariant):
        kernels = [(d.kernel, d.recurrent_kernel, d.bias.reshape(-1)) for d in directions]
    else:
        kernels = [(_onnx_gates(d.kernel), _onnx_gates(d.recurrent_kernel),
                    np.concatenate([_onnx_gates(d.bias), np.zeros_like(d.bias)])) for d in directions]
    return (graph.const(f"{prefix}_W", np.stack([k.T for k, _, _ in kernels])),
            graph.const(f"{prefix}_R", np.stack([r.T for _, r, _ in kernels])),
            graph.const(f"{prefix}_B", np.stack([b for _, _, b in kernels])))


def _onnx_gates(array: np.ndarray) -> np.ndarray:
    """An LSTM kernel's (or bias's) Keras gate blocks i, f, c, o in ONNX's order i, o, f, c."""
    blocks = np.split(array, 4, axis=-1)
    return np.concatenate([blocks[g] for g in LSTM_GATE_ORDER], axis=-1)


def _reverse(graph: _Graph, x: str, lengths: str) -> str:
    """Each sequence of a time-major ``(steps, batch, width)`` tensor reversed within its length."""
    return graph.op("ReverseSequence", [x, lengths], batch_axis=1, time_axis=0)


def _merge(graph: _Graph, layer: RecurrentLayer, prefix: str, y: str) -> str:
    """``y (steps, dirs, batch, U)`` to ``(steps, batch, width)`` by the layer's merge mode."""
    if not layer.bidirectional:
        return graph.op("Squeeze", [y, graph.const(f"{prefix}_axis", np.array([1], np.int64))])
    if layer.merge_mode == "concat":
        per_step = graph.op("Transpose", [y], perm=[0, 2, 1, 3])
        shape = graph.const(f"{prefix}_shape", np.array([0, 0, -1], np.int64))
        return graph.op("Reshape", [per_step, shape])
    axis = graph.const(f"{prefix}_axis", np.array([1], np.int64))
    return graph.op(MERGE_REDUCERS[layer.merge_mode], [y, axis], keepdims=0)


def cell_attributes(variant: CellVariant, directions: int) -> dict[str, object]:
    """The op's variant attributes: a GRU's ``linear_before_reset``, and each cell's
    activations (``[f, g]`` per GRU direction, ``[f, g, h]`` per LSTM direction)."""
    if isinstance(variant, GRUVariant):
        roles = [variant.recurrent_activation, variant.activation]
        return {"linear_before_reset": int(variant.reset_after), **activation_attributes(roles, directions)}
    roles = [variant.recurrent_activation, variant.activation, variant.activation]
    return activation_attributes(roles, directions)


def activation_attributes(roles: list[str], directions: int) -> dict[str, list]:
    """``activations`` (the spec's names ``roles``, per direction); alphas and betas are listed
    only for the functions that take them, in order (ONNX consumes them that way). ONNX's
    defaults (Sigmoid, Tanh[, Tanh]) are cuDNN's: then nothing is set, and a cuDNN model's
    graph is as before."""
    if roles[0] == "sigmoid" and all(role == "tanh" for role in roles[1:]):
        return {}
    names = [GRU_ACTIVATION_OPS[role] for role in roles] * directions
    attributes: dict[str, list] = {"activations": [op for op, _, _ in names]}
    alphas = [alpha for _, alpha, _ in names if alpha is not None]
    betas = [beta for _, _, beta in names if beta is not None]
    if alphas:
        attributes["activation_alpha"] = alphas
    if betas:
        attributes["activation_beta"] = betas
    return attributes


def _dense(graph: _Graph, dense: DenseLayer, index: int, x: str, output: str | None) -> str:
    x = graph.op("MatMul", [x, graph.const(f"dense{index}_kernel", dense.kernel)])
    if dense.bias is not None:
        x = graph.op("Add", [x, graph.const(f"dense{index}_bias", dense.bias)])
    activation = ACTIVATION_OPS.get(dense.activation)
    if activation is None:
        return graph.op("Identity", [x], output) if output else x
    if activation == "Softmax":
        return graph.op(activation, [x], output, axis=-1)
    return graph.op(activation, [x], output)
