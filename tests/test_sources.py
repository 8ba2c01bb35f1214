"""PyTorch safetensors and TF 1.x CudnnGRU checkpoints, against the NumPy cuDNN reference
and (for the shared segmenter) the GPU's own outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from app.engine.selfcheck import run_self_check
from app.errors import ModelError
from app.formats.bundle import load_bundle
from tests.conftest import DEFAULT_MODEL, FIXTURES
from tests.helpers import max_diff, outputs, runner_for
from tests.reference import (
    NativeModel,
    random_model,
    to_tf1_canonical,
    to_tf1_canonical_lstm,
    to_torch,
    to_torch_lstm,
)


def sequences(rng: np.random.Generator, vocab: int, max_len: int = 12) -> list[list[int]]:
    return [rng.integers(0, vocab, n).tolist() for n in range(1, max_len + 1)]


def write_dir(directory: Path, artifact: str, **manifest) -> Path:
    (directory / "model.json").write_text(json.dumps({"artifact": artifact, **manifest}))
    return directory


@pytest.mark.parametrize(("artifact", "file_format", "conversion"), [
    ("segmenter.safetensors", "pytorch-safetensors", "torch-gru->keras-gru"),
    ("segmenter_weights.h5", "keras2-h5-weights", "cudnn-gru->keras-gru"),
])
def test_shared_segmenter_files_reproduce_the_gpu(tmp_path: Path, artifact: str, file_format: str,
                                                   conversion: str) -> None:
    """The same GPU-trained weights as a PyTorch state_dict and as a Keras 2 weights-only file,
    each with a model.json, give the GPU's own outputs."""
    shutil.copy(FIXTURES / artifact, tmp_path)
    shutil.copy(DEFAULT_MODEL / "segmenter.ref.npz", tmp_path)
    write_dir(tmp_path, artifact, architecture={"head_activation": "softmax"},
              parity={"file": "segmenter.ref.npz", "outputs": "probs_fp32", "hidden": "hidden_fp32"})
    bundle = load_bundle(tmp_path)
    assert (bundle.spec.source.format, bundle.spec.source.conversion) == (file_format, conversion)
    assert [layer.units for layer in bundle.spec.layers] == [128, 128]
    check = run_self_check(bundle.parity, runner_for(bundle.spec, "onnxruntime", 256, 32).run, 1e-4)
    assert check.passed and check.max_abs_diff_outputs <= 1e-4 and check.max_abs_diff_hidden <= 1e-4


def torch_state(model: NativeModel, emb: str = "emb", gru: str = "gru", head: str = "head") -> dict:
    """An nn.Module's state_dict; a Dense stack is ``head.0``, ``head.2``, ... (nn.Sequential
    with activations between), the last one ``head``."""
    state = {} if model.embeddings is None else {f"{emb}.weight": model.embeddings}
    for index, (kernel, bias, _) in enumerate(model.stack):
        state |= {f"{head}.{2 * index}.weight": kernel.T.copy(), f"{head}.{2 * index}.bias": bias}
    for k, (forward, backward) in enumerate(model.layers):
        for direction, native in (("", forward), ("_reverse", backward)):
            if native is not None:
                encode = to_torch_lstm if "i" in native.W else to_torch  # an nn.LSTM's gates
                state |= {f"{gru}.{name}_l{k}{direction}": a for name, a in encode(native).items()}
    if model.head_kernel is not None:
        state |= {f"{head}.weight": model.head_kernel.T.copy(), f"{head}.bias": model.head_bias}
    return state


@pytest.mark.parametrize(("engine", "layers", "bidirectional", "head"), [
    ("onnxruntime", 1, True, 5), ("onnxruntime", 2, True, 5), ("onnxruntime", 2, False, 3),
    ("onnxruntime", 2, True, None), ("keras", 2, True, 5), ("keras", 2, True, None),
])
def test_torch_state_dicts_match_numpy_reference(tmp_path: Path, engine: str, layers: int,
                                                 bidirectional: bool, head: int | None) -> None:
    rng = np.random.default_rng(layers * 7 + bidirectional)
    model = random_model(rng, vocab=30, width=6, units=4, layers=layers, bidirectional=bidirectional,
                         head=head, head_activation="sigmoid")
    save_file(torch_state(model), str(tmp_path / "m.safetensors"))
    write_dir(tmp_path, "m.safetensors", architecture={"head_activation": "sigmoid"})
    spec = load_bundle(tmp_path).spec
    assert (not spec.dense) == (head is None)
    seqs = sequences(rng, 30)
    assert max_diff(outputs(spec, seqs, engine), [model.outputs(np.asarray(s)) for s in seqs]) < 1e-5


def test_torch_tensor_names_can_be_given(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model = random_model(rng, vocab=30, width=8, units=8, layers=1, head=8)  # every matrix is (*, 8)
    state = torch_state(model, emb="encoder.tokens", gru="encoder.rnn", head="decoder.out")
    state["decoder.extra.weight"] = np.zeros((3, 8), np.float32)
    save_file(state, str(tmp_path / "m.safetensors"))
    write_dir(tmp_path, "m.safetensors")
    with pytest.raises(ModelError, match="cannot tell which tensor is the embedding"):
        load_bundle(tmp_path)
    write_dir(tmp_path, "m.safetensors", architecture={
        "head_activation": "softmax",
        "tensors": {"embedding": "encoder.tokens", "gru": "encoder.rnn", "head": "decoder.out"}})
    spec = load_bundle(tmp_path).spec
    seqs = sequences(rng, 30)
    assert max_diff(outputs(spec, seqs, "onnxruntime"), [model.outputs(np.asarray(s)) for s in seqs]) < 1e-5


def test_torch_feature_model_with_a_dense_stack(tmp_path: Path) -> None:
    """No embedding (architecture.input = "features") and an nn.Sequential head named in order."""
    rng = np.random.default_rng(2)
    model = random_model(rng, vocab=None, width=5, units=4, layers=2, stack=((6, "relu"),), head=3,
                         head_activation="softmax")
    save_file(torch_state(model), str(tmp_path / "m.safetensors"))
    write_dir(tmp_path, "m.safetensors", architecture={
        "input": "features", "tensors": {"head": ["head.0", "head"]},
        "head_activations": ["relu", "softmax"]})
    spec = load_bundle(tmp_path).spec
    assert spec.input.kind == "features" and [d.activation for d in spec.dense] == ["relu", "softmax"]
    assert all(layer.variant.is_cudnn for layer in spec.layers)  # PyTorch's GRU: always reset_after
    inputs = [rng.normal(0, 1, (n, 5)).astype(np.float32) for n in range(1, 13)]
    assert max_diff(outputs(spec, inputs, "onnxruntime"), [model.outputs(s) for s in inputs]) < 1e-5


def test_truncated_safetensors(tmp_path: Path) -> None:
    (tmp_path / "m.safetensors").write_bytes((FIXTURES / "segmenter.safetensors").read_bytes()[:5000])
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_bundle(tmp_path / "m.safetensors")


def write_tf1_checkpoint(prefix: Path, model: NativeModel, head_scope: str = "output/dense") -> Path:
    import tensorflow as tf

    variables = {} if model.embeddings is None else {"embedding/embedding_matrix": model.embeddings}
    for index, (kernel, bias, _) in enumerate(model.stack):
        variables |= {f"mlp/dense_{index}/kernel": kernel, f"mlp/dense_{index}/bias": bias}
    for i, (forward, backward) in enumerate(model.layers):
        lstm = "i" in forward.W  # a CudnnLSTM's gates
        cell = "cudnn_compatible_lstm_cell" if lstm else "cudnn_compatible_gru_cell"
        if backward is None:
            bases = {f"rnn/multi_rnn_cell/cell_{i}/{cell}/": forward}
        else:
            scope = f"stack_bidirectional_rnn/cell_{i}/bidirectional_rnn"
            bases = {f"{scope}/fw/{cell}/": forward, f"{scope}/bw/{cell}/": backward}
        encode, kernel = (to_tf1_canonical_lstm, "kernel") if lstm else (to_tf1_canonical, "gates/kernel")
        for base, native in bases.items():
            variables |= {base + name: array for name, array in encode(native).items()}
            variables[f"{base}{kernel}/Adam"] = np.zeros_like(variables[base + kernel])
    if model.head_kernel is not None:
        variables |= {f"{head_scope}/kernel": model.head_kernel, f"{head_scope}/bias": model.head_bias}
    variables["global_step"] = np.array(1000, np.int64)
    saver = tf.compat.v1.train.Saver(var_list={k: tf.Variable(v) for k, v in variables.items()})
    return Path(saver.save(None, str(prefix)))


@pytest.mark.parametrize(("engine", "layers", "bidirectional"), [
    ("onnxruntime", 1, False), ("onnxruntime", 2, False), ("onnxruntime", 1, True), ("onnxruntime", 2, True),
    ("keras", 2, False), ("keras", 2, True),
])
def test_tf1_checkpoints_match_numpy_reference(tmp_path: Path, engine: str, layers: int,
                                               bidirectional: bool) -> None:
    rng = np.random.default_rng(layers + 10 * bidirectional)
    model = random_model(rng, vocab=25, width=5, units=3, layers=layers, bidirectional=bidirectional)
    prefix = write_tf1_checkpoint(tmp_path / "model.ckpt", model)
    write_dir(tmp_path, "model.ckpt", architecture={"head_activation": "softmax"})
    spec = load_bundle(tmp_path).spec
    assert spec.source.format == "tf1-cudnngru-checkpoint" and len(spec.dense) == 1
    assert spec.source.path == str(prefix)
    seqs = sequences(rng, 25)
    assert max_diff(outputs(spec, seqs, engine), [model.outputs(np.asarray(s)) for s in seqs]) < 1e-5


def test_tf1_feature_model_with_a_dense_stack(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    model = random_model(rng, vocab=None, width=4, units=3, layers=2, stack=((5, "tanh"),), head=2,
                         head_activation="sigmoid")
    write_tf1_checkpoint(tmp_path / "model.ckpt", model)
    write_dir(tmp_path, "model.ckpt", architecture={
        "input": "features", "tensors": {"head": ["mlp/dense_0", "output/dense"]},
        "head_activations": ["tanh", "sigmoid"]})
    spec = load_bundle(tmp_path).spec
    assert spec.input.kind == "features" and len(spec.dense) == 2
    inputs = [rng.normal(0, 1, (n, 4)).astype(np.float32) for n in range(1, 13)]
    assert max_diff(outputs(spec, inputs, "onnxruntime"), [model.outputs(s) for s in inputs]) < 1e-5


def test_tf1_checkpoint_without_gru_cells_is_refused(tmp_path: Path) -> None:
    import tensorflow as tf

    saver = tf.compat.v1.train.Saver(var_list={"w": tf.Variable(np.zeros((2, 2), np.float32))})
    prefix = saver.save(None, str(tmp_path / "model.ckpt"))
    with pytest.raises(ModelError, match="no cudnn_compatible_gru_cell or cudnn_compatible_lstm_cell"):
        load_bundle(Path(prefix))
