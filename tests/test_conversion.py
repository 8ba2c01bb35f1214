"""Model files -> canonical spec -> both engines, against independent references:
the NumPy GRU (cuDNN's equations), tf_keras's own converter, and the shared fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.formats.bundle import load_bundle
from app.formats.keras_h5 import read_keras_h5
from app.formats.manifest import Architecture
from tests.conftest import FIXTURES
from tests.helpers import ENGINES, max_diff, outputs, tf_keras
from tests.keras2_files import write_full_model, write_weights_only
from tests.keras2_taggers import alone
from tests.reference import random_model

LEGACY = FIXTURES / "legacy"
LEGACY_HEADS = {"A": "softmax", "B": "softmax", "C": "linear", "D": "softmax"}


def legacy_file(key: str, kind: str) -> Path:
    return next(LEGACY.glob(f"{key}_*_{kind}.h5"))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("key", ["A", "B", "C", "D"])
def test_legacy_full_models_match_expected(key: str, engine: str, legacy_expected: dict) -> None:
    spec = read_keras_h5(legacy_file(key, "model"), Architecture(), key)
    got = outputs(spec, legacy_expected["sequences"], engine)
    expected = [np.asarray(e) for e in legacy_expected["expected"][key]]
    assert max_diff(got, expected) < 1e-5


@pytest.mark.parametrize(("key", "engine"), [("A", "onnxruntime"), ("B", "onnxruntime"), ("C", "onnxruntime"),
                                             ("D", "onnxruntime"), ("B", "keras"), ("C", "keras")])
def test_legacy_weights_only_files_with_architecture_match_expected(key: str, engine: str,
                                                                    legacy_expected: dict) -> None:
    directions = {"cu_dnngru": "forward", "cu_dnngru_1": "backward"} if key == "B" else {}
    architecture = Architecture(head_activation=LEGACY_HEADS[key], directions=directions)
    spec = read_keras_h5(legacy_file(key, "weights"), architecture, key)
    assert spec.source.format == "keras2-h5-weights"
    got = outputs(spec, legacy_expected["sequences"], engine)
    assert max_diff(got, [np.asarray(e) for e in legacy_expected["expected"][key]]) < 1e-5


def test_manual_pair_is_recognised_from_the_graph() -> None:
    spec = read_keras_h5(legacy_file("B", "model"), Architecture(), "B")
    (layer,) = spec.layers
    assert layer.bidirectional and layer.name == "cu_dnngru+cu_dnngru_1"


CASES = [
    # (layers, merge_mode, bidirectional, width, units)
    (1, "concat", True, 6, 4),
    (2, "concat", True, 6, 4),
    (1, "sum", True, 5, 3),
    (2, "sum", True, 5, 3),
    (1, "ave", True, 3, 5),
    (2, "ave", True, 3, 5),
    (1, "mul", True, 4, 6),
    (2, "mul", True, 4, 6),
    (2, None, False, 6, 4),
]


def _sequences(rng: np.random.Generator, vocab: int, max_len: int = 12) -> list[list[int]]:
    return [rng.integers(0, vocab, length).tolist() for length in range(1, max_len + 1)]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("layers", "merge_mode", "bidirectional", "width", "units"), CASES)
def test_generated_cudnngru_files_match_numpy_reference(
    tmp_path: Path, engine: str, layers: int, merge_mode: str | None, bidirectional: bool,
    width: int, units: int,
) -> None:
    rng = np.random.default_rng(layers * 10 + width)
    model = random_model(rng, vocab=20, width=width, units=units, layers=layers,
                         bidirectional=bidirectional, merge_mode=merge_mode or "concat")
    spec = read_keras_h5(write_full_model(tmp_path / "m.h5", model), Architecture(), "m")
    assert spec.source.conversion == "cudnn-gru->keras-gru"
    sequences = _sequences(rng, 20)
    expected = [model.outputs(np.asarray(s)) for s in sequences]
    assert max_diff(outputs(spec, sequences, engine), expected) < 1e-5


@pytest.mark.parametrize("engine", ENGINES)
def test_generated_keras_gru_file_needs_no_conversion(tmp_path: Path, engine: str) -> None:
    rng = np.random.default_rng(11)
    model = random_model(rng, vocab=20, width=6, units=4, layers=2)
    spec = read_keras_h5(write_full_model(tmp_path / "g.h5", model, cell="GRU"), Architecture(), "g")
    assert spec.source.conversion.startswith("none")
    sequences = _sequences(rng, 20)
    assert max_diff(outputs(spec, sequences, engine),
                    [model.outputs(np.asarray(s)) for s in sequences]) < 1e-5


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "ave", "mul"])
def test_matches_tf_keras_own_converter(tmp_path: Path, merge_mode: str) -> None:
    """tf_keras converts CuDNNGRU weights itself when loading them into GRU(reset_after=True)."""
    keras2 = tf_keras()
    rng = np.random.default_rng(21)
    model = random_model(rng, vocab=20, width=6, units=4, layers=2, merge_mode=merge_mode)
    weights_file = write_weights_only(tmp_path / "w.h5", model)
    layers = keras2.layers
    reference = keras2.Sequential([
        layers.InputLayer(input_shape=(None,)),
        layers.Embedding(20, 6, name="embedding"),
        *[layers.Bidirectional(layers.GRU(4, return_sequences=True, reset_after=True),
                               merge_mode=merge_mode, name=f"bigru_{i}") for i in range(2)],
        layers.TimeDistributed(layers.Dense(5, activation="softmax"), name="head"),
    ])
    reference.load_weights(str(weights_file))
    sequences = _sequences(rng, 20)
    expected = alone(reference, [np.asarray(s, np.int32) for s in sequences])
    spec = read_keras_h5(weights_file, Architecture(merge_mode=merge_mode, head_activation="softmax"), "w")
    assert max_diff(outputs(spec, sequences, "onnxruntime"), expected) < 1e-5


def test_default_model_bundle_reads_everything() -> None:
    bundle = load_bundle(Path(__file__).resolve().parent.parent / "models" / "segmenter")
    assert bundle.spec.source.conversion == "cudnn-gru->keras-gru"
    assert bundle.vocabulary is not None and len(bundle.vocabulary) == bundle.spec.vocab_size == 96
    assert bundle.parity is not None and len(bundle.parity.sequences) == 32


def test_manual_pair_directions_from_the_architecture_file(tmp_path: Path, legacy_expected: dict) -> None:
    """When the Lambdas can't be read, the architecture file says which layer runs backward."""
    import json
    import shutil

    import h5py

    path = tmp_path / "b.h5"
    shutil.copy(legacy_file("B", "model"), path)
    with h5py.File(path, "a") as file:
        config = json.loads(file.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Lambda":
                layer["config"]["function"] = ["AAAA", None, None]
        file.attrs["model_config"] = json.dumps(config)
    (tmp_path / "model.json").write_text(json.dumps({"artifact": "b.h5", "architecture": {
        "directions": {"cu_dnngru": "forward", "cu_dnngru_1": "backward"}}}))
    spec = load_bundle(tmp_path).spec
    got = outputs(spec, legacy_expected["sequences"], "onnxruntime")
    assert max_diff(got, [np.asarray(e) for e in legacy_expected["expected"]["B"]]) < 1e-5


def test_weights_only_manual_pair_needs_consistent_directions() -> None:
    from app.errors import ModelError

    both_forward = Architecture(directions={"cu_dnngru": "forward", "cu_dnngru_1": "forward"})
    with pytest.raises(ModelError, match="both marked forward"):
        read_keras_h5(legacy_file("B", "weights"), both_forward, "B")
    alone = Architecture(directions={"cu_dnngru_1": "backward"})
    with pytest.raises(ModelError, match="'cu_dnngru_1' is marked backward but the next layer is not"):
        read_keras_h5(legacy_file("B", "weights"), alone, "B")
