"""Builds an ONNX graph from a :class:`~app.spec.ModelSpec`, for ONNX Runtime and for export.

ONNX's ``GRU`` operator with ``linear_before_reset=1`` computes the same equations as
cuDNN and Keras' ``GRU(reset_after=True)`` (see :mod:`app.spec`), with its own layout:
``W (dirs, 3U, I)``, ``R (dirs, 3U, U)``, ``B (dirs, 6U)``, gates z, r, h — the Keras
kernels transposed, the two bias rows concatenated. Its ``sequence_lens`` input makes
the reverse direction start at each sequence's last real token and zeroes the steps past
it, so a right-padded batch gives every sequence exactly its own numbers.

Inputs: ``ids (batch, steps) int32`` and ``lengths (batch,) int32``.
Outputs: ``outputs (batch, steps, C)`` and ``hidden (batch, steps, H)``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from app.spec import DenseHead, ModelSpec, RecurrentLayer

OPSET = 18
IR_VERSION = 10  # what ONNX Runtime 1.2x reads; opset 18 needs IR >= 8
ACTIVATION_OPS = {"softmax": "Softmax", "sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
MERGE_REDUCERS = {"sum": "ReduceSum", "ave": "ReduceMean", "mul": "ReduceProd"}


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
    embedded = graph.op("Gather", [graph.const("embeddings", spec.embeddings), "ids"])
    x = graph.op("Transpose", [embedded], perm=[1, 0, 2])  # time-major for the GRU op
    for index, layer in enumerate(spec.layers):
        x = _recurrent(graph, layer, index, x)
    hidden = graph.op("Transpose", [x], "hidden", perm=[1, 0, 2])
    if spec.head is None:
        graph.op("Identity", [hidden], "outputs")
    else:
        _head(graph, spec.head, hidden)
    inputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "steps"]),
        helper.make_tensor_value_info("lengths", TensorProto.INT32, ["batch"]),
    ]
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
        "GRU", [x, w, r, b, "lengths"], hidden_size=layer.units, linear_before_reset=1,
        direction="bidirectional" if layer.bidirectional else "forward",
    )  # y: (steps, dirs, batch, U)
    if not layer.bidirectional:
        return graph.op("Squeeze", [y, graph.const(f"{prefix}_axis", np.array([1], np.int64))])
    if layer.merge_mode == "concat":
        per_step = graph.op("Transpose", [y], perm=[0, 2, 1, 3])
        shape = graph.const(f"{prefix}_shape", np.array([0, 0, -1], np.int64))
        return graph.op("Reshape", [per_step, shape])
    axis = graph.const(f"{prefix}_axis", np.array([1], np.int64))
    return graph.op(MERGE_REDUCERS[layer.merge_mode], [y, axis], keepdims=0)


def _head(graph: _Graph, head: DenseHead, hidden: str) -> None:
    x = graph.op("MatMul", [hidden, graph.const("head_kernel", head.kernel)])
    if head.bias is not None:
        x = graph.op("Add", [x, graph.const("head_bias", head.bias)])
    activation = ACTIVATION_OPS.get(head.activation)
    if activation is None:
        graph.op("Identity", [x], "outputs")
    elif activation == "Softmax":
        graph.op(activation, [x], "outputs", axis=-1)
    else:
        graph.op(activation, [x], "outputs")
