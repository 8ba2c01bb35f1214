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

Inputs: ``ids (batch, steps) int32`` or ``features (batch, steps, F) float32`` (the spec's
input name), and ``lengths (batch,) int32``.
Outputs: ``outputs (batch, steps, C)`` and ``hidden (batch, steps, H)``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.spec import DenseLayer, GRUVariant, ModelSpec, RecurrentLayer, TokenInput

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


def build_onnx_model(spec: ModelSpec) -> onnx.ModelProto:
    graph = _Graph()
    if isinstance(spec.input, TokenInput):
        steps = graph.op("Gather", [graph.const("embeddings", spec.input.embeddings), spec.input.name])
        input_info = helper.make_tensor_value_info(spec.input.name, TensorProto.INT32, ["batch", "steps"])
    else:
        steps = spec.input.name
        input_info = helper.make_tensor_value_info(spec.input.name, TensorProto.FLOAT,
                                                   ["batch", "steps", spec.input.features])
    x = graph.op("Transpose", [steps], perm=[1, 0, 2])  # time-major for the GRU op
    for index, layer in enumerate(spec.layers):
        x = _recurrent(graph, layer, index, x)
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
    """One GRU layer on ``x (steps, batch, I)``; returns ``(steps, batch, width)``."""
    directions = layer.directions()
    prefix = f"gru{index}"
    w = graph.const(f"{prefix}_W", np.stack([d.kernel.T for d in directions]))
    r = graph.const(f"{prefix}_R", np.stack([d.recurrent_kernel.T for d in directions]))
    b = graph.const(f"{prefix}_B", np.stack([d.bias.reshape(-1) for d in directions]))
    y = graph.op(
        "GRU", [x, w, r, b, "lengths"], hidden_size=layer.units,
        linear_before_reset=int(layer.variant.reset_after),
        direction="bidirectional" if layer.bidirectional else "forward",
        **gru_activation_attributes(layer.variant, len(directions)),
    )  # y: (steps, dirs, batch, U)
    if not layer.bidirectional:
        return graph.op("Squeeze", [y, graph.const(f"{prefix}_axis", np.array([1], np.int64))])
    if layer.merge_mode == "concat":
        per_step = graph.op("Transpose", [y], perm=[0, 2, 1, 3])
        shape = graph.const(f"{prefix}_shape", np.array([0, 0, -1], np.int64))
        return graph.op("Reshape", [per_step, shape])
    axis = graph.const(f"{prefix}_axis", np.array([1], np.int64))
    return graph.op(MERGE_REDUCERS[layer.merge_mode], [y, axis], keepdims=0)


def gru_activation_attributes(variant: GRUVariant, directions: int) -> dict[str, list]:
    """``activations`` ``[f, g]`` per direction; alphas and betas are listed only for the
    functions that take them, in order (ONNX consumes them that way). ONNX's defaults
    (Sigmoid, Tanh) are cuDNN's: then nothing is set, and a cuDNN model's graph is as before."""
    if variant.recurrent_activation == "sigmoid" and variant.activation == "tanh":
        return {}
    names = [GRU_ACTIVATION_OPS[variant.recurrent_activation], GRU_ACTIVATION_OPS[variant.activation]]
    names *= directions
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
