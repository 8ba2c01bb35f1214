"""The ONNX graph the service runs, built from a spec, against the NumPy GRU: every head
activation, no head, a unidirectional stack, every merge mode, hidden states included, and
each sequence's own length honoured inside a right-padded batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import max_diff, runner_for, spec_of
from tests.reference import random_model

LENGTHS = (1, 2, 5, 8, 13, 16)


@pytest.mark.parametrize(("layers", "bidirectional", "merge_mode", "head", "activation"), [
    (1, True, "concat", 3, "softmax"),
    (2, True, "concat", 3, "sigmoid"),
    (1, True, "sum", 4, "tanh"),
    (2, True, "ave", 4, "relu"),
    (1, True, "mul", 2, "linear"),
    (2, False, "concat", 3, "softmax"),
    (1, False, "concat", None, "linear"),
    (2, True, "concat", None, "linear"),
])
def test_graph_matches_numpy_reference(tmp_path: Path, layers: int, bidirectional: bool, merge_mode: str,
                                       head: int | None, activation: str) -> None:
    rng = np.random.default_rng(layers * 100 + (head or 0) * 10 + len(merge_mode))
    model = random_model(rng, vocab=25, width=5, units=3, layers=layers, bidirectional=bidirectional,
                         merge_mode=merge_mode, head=head, head_activation=activation)
    spec = spec_of(model, tmp_path)
    assert spec.output_width == (head or spec.hidden_width)
    sequences = [rng.integers(0, 25, n).astype(np.int32) for n in LENGTHS]
    got = runner_for(spec, "onnxruntime", max_len=16, max_batch_size=len(LENGTHS)).run(sequences)
    assert max_diff([o for o, _ in got], [model.outputs(s) for s in sequences]) < 1e-5
    assert max_diff([h for _, h in got], [model.hidden(s) for s in sequences]) < 1e-5
    reversed_outputs, reversed_hidden = run_reversed_graph(spec, sequences)
    assert max_diff(reversed_outputs, [model.outputs(s) for s in sequences]) < 1e-5
    assert max_diff(reversed_hidden, [model.hidden(s) for s in sequences]) < 1e-5


@pytest.mark.parametrize(("reset_after", "recurrent_activation", "activation", "bidirectional", "vocab"), [
    (False, "hard_sigmoid", "tanh", True, 20),  # Keras 2's default GRU
    (True, "sigmoid", "linear", False, 20),
    (True, "elu", "softsign", True, None),  # feature vectors in
])
def test_keras2_gru_variants_lower_with_their_equations(
        tmp_path: Path, reset_after: bool, recurrent_activation: str, activation: str,
        bidirectional: bool, vocab: int | None) -> None:
    from app.formats.keras_h5 import read_keras_h5
    from app.formats.manifest import Architecture
    from tests.keras2_files import write_full_model
    from tests.reference import Variant

    rng = np.random.default_rng(7)
    model = random_model(rng, vocab=vocab, width=5, units=4, layers=2, bidirectional=bidirectional,
                         variant=Variant(reset_after, recurrent_activation, activation),
                         stack=((6, "tanh"), (7, "linear")), scale=0.3)
    spec = read_keras_h5(write_full_model(tmp_path / "m.h5", model, cell="GRU"), Architecture(), "m")
    sequences = [spec.input.sample(rng, n) for n in LENGTHS]
    expected = [model.outputs(s) for s in sequences]
    got = runner_for(spec, "onnxruntime", max_len=16, max_batch_size=len(LENGTHS)).run(sequences)
    assert max_diff([o for o, _ in got], expected) < 1e-5
    assert max_diff(run_reversed_graph(spec, sequences)[0], expected) < 1e-5


def run_reversed_graph(spec, sequences: list[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The graph OpenVINO is given (forward-only GRU ops, the backward one on each sequence
    reversed within its length), run by ONNX Runtime on one padded batch."""
    import onnxruntime as ort

    from app.lowering.onnx_graph import build_onnx_model

    lengths = np.array([len(s) for s in sequences], np.int32)
    padded = spec.input.blank(len(sequences), int(lengths.max()))
    for row, sequence in enumerate(sequences):
        padded[row, :len(sequence)] = sequence
    model = build_onnx_model(spec, "reversed")
    grus = [node for node in model.graph.node if node.op_type == "GRU"]
    assert all(len(node.input) == 4 for node in grus)  # plain forward GRUs, no sequence_lens
    assert any(node.op_type == "ReverseSequence" for node in model.graph.node) == spec.layers[0].bidirectional
    graph = model.SerializeToString()
    outputs, hidden = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(
        ["outputs", "hidden"], {spec.input.name: padded, "lengths": lengths})
    return ([outputs[row, :n] for row, n in enumerate(lengths)],
            [hidden[row, :n] for row, n in enumerate(lengths)])


def test_exported_graph_declares_its_inputs_and_outputs(tmp_path: Path) -> None:
    from app.lowering.onnx_graph import OPSET, build_onnx_model

    model = random_model(np.random.default_rng(0), vocab=25, width=5, units=3, layers=2, head=4)
    graph = build_onnx_model(spec_of(model, tmp_path))
    def dims(value: object) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]  # type: ignore[attr-defined]

    # The documented interface of an exported model: ids (B, T), lengths (B,) -> (B, T, C), (B, T, H),
    # with the same symbolic B and T throughout.
    assert {i.name: dims(i) for i in graph.graph.input} == {"ids": ["batch", "steps"], "lengths": ["batch"]}
    assert {o.name: dims(o) for o in graph.graph.output} == {"outputs": ["batch", "steps", 4],
                                                             "hidden": ["batch", "steps", 6]}
    assert graph.opset_import[0].version == OPSET and graph.producer_name == "bigru-serve"
    # the serving lowering: one GRU op per layer reading the lengths, cuDNN's default activations
    grus = [node for node in graph.graph.node if node.op_type == "GRU"]
    assert len(grus) == 2 and all(node.input[4] == "lengths" for node in grus)
    attributes = {a.name for node in grus for a in node.attribute}
    assert attributes == {"hidden_size", "linear_before_reset", "direction"}
    assert not any(node.op_type == "ReverseSequence" for node in graph.graph.node)
    features = random_model(np.random.default_rng(0), vocab=None, width=5, units=3, layers=1, head=4)
    (tmp_path / "f").mkdir()
    feature_graph = build_onnx_model(spec_of(features, tmp_path / "f"))
    assert {i.name: dims(i) for i in feature_graph.graph.input} == {"features": ["batch", "steps", 5],
                                                                     "lengths": ["batch"]}
    assert feature_graph.graph.input[0].type.tensor_type.elem_type == 1  # FLOAT
