"""Keras 2's own GRU (reset_after False/True, every activation both engines compute exactly),
Dense-stack heads and feature-vector inputs, against tf_keras (Keras 2's implementation) on
files it wrote, and against the NumPy GRU written from the equations (tests/reference.py).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest

from app.engine.runner import Runner
from app.errors import ModelError
from app.formats.bundle import load_bundle
from app.formats.keras_h5 import read_keras_h5
from app.formats.manifest import Architecture
from app.spec import GRU_ACTIVATIONS, FeatureInput, GRUVariant, ModelSpec
from tests.helpers import VARIANT_ENGINES, max_diff, runner_for, tf_keras
from tests.keras2_files import write_full_model, write_weights_only
from tests.keras2_taggers import Tagger, alone, as_keras_2_1, build, sequences
from tests.reference import GRU_ACTIVATIONS as REFERENCE_ACTIVATIONS
from tests.reference import Variant, random_model

TOLERANCE = 1e-5
# The candidate activation cycles so that every one is also used as `activation`.
CANDIDATES = ("tanh", "relu", "softsign", "elu", "sigmoid", "hard_sigmoid", "softplus", "linear")
TAGGERS = [
    Tagger(reset_after, recurrent, CANDIDATES[(index + reset_after) % len(CANDIDATES)],
           inputs="features" if index % 2 else "tokens", masking=index % 4 == 1,
           head=("stack", "dense", "none")[index % 3])
    for reset_after in (False, True)
    for index, recurrent in enumerate(GRU_ACTIVATIONS)
]


@cache
def saved(tagger: Tagger, directory: str) -> tuple[Path, list[np.ndarray], list[np.ndarray]]:
    """The tagger's ``.h5`` as tf_keras saves it, inputs, and tf_keras' outputs per sequence."""
    model = build(tagger)
    path = Path(directory) / f"{abs(hash(tagger))}.h5"
    model.save(path)
    inputs = sequences(tagger, np.random.default_rng(1))
    return path, inputs, alone(model, inputs)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("taggers"))


def run_both_ways(spec: ModelSpec, inputs: list[np.ndarray], engine: str
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All sequences in one call (the runner batches them), and each on its own: the keras
    engine compiles two shapes, (16, 12) and (1, 12)."""
    runner = one_bucket_runner(spec, inputs, engine)
    batched = run_batched(runner, inputs)
    single = [runner.run([s])[0][0] for s in inputs]
    return batched, single


def one_bucket_runner(spec: ModelSpec, inputs: list[np.ndarray], engine: str) -> Runner:
    """One length bucket, the longest input's: the keras engine compiles one length."""
    return runner_for(spec, engine, max_batch_size=16, buckets=[max(len(s) for s in inputs)])


def run_batched(runner: Runner, inputs: list[np.ndarray]) -> list[np.ndarray]:
    return [outputs for outputs, _ in runner.run(inputs)]


def batched_and_alone_match(spec: ModelSpec, inputs: list[np.ndarray], engine: str,
                            expected: list[np.ndarray]) -> None:
    """Batched within TOLERANCE of tf_keras' sequences alone. The keras engine compiles each
    padded shape for seconds: it is checked batched only (each sequence against its own
    reference), its batched == alone on a variant below and on every length in test_exactness."""
    if engine == "keras":
        assert max_diff(run_batched(one_bucket_runner(spec, inputs, engine), inputs), expected) <= TOLERANCE
        return
    batched, single = run_both_ways(spec, inputs, engine)
    assert max_diff(batched, expected) <= TOLERANCE
    assert max_diff(single, batched) <= 1e-6


def test_every_variant_is_covered() -> None:
    """Each reset_after x recurrent activation, with every merge mode as one of its layers."""
    assert {(t.reset_after, t.recurrent_activation) for t in TAGGERS} == \
        {(r, a) for r in (False, True) for a in GRU_ACTIVATIONS}
    assert {t.activation for t in TAGGERS} == set(GRU_ACTIVATIONS)
    assert {t.inputs for t in TAGGERS} == {"tokens", "features"} and any(t.masking for t in TAGGERS)


def matches_tf_keras(tagger: Tagger, engine: str, workdir: str) -> None:
    path, inputs, expected = saved(tagger, workdir)
    spec = read_keras_h5(path, Architecture(), "tagger")
    assert {layer.variant for layer in spec.layers} == {
        GRUVariant(tagger.reset_after, tagger.recurrent_activation, tagger.activation)}
    assert [layer.merge_mode if layer.bidirectional else None for layer in spec.layers] == \
        ["concat", "sum", "ave", "mul", None]
    assert spec.input.kind == tagger.inputs
    if tagger.masking:
        assert spec.input == FeatureInput(tagger.width, 0.0)
    assert [d.activation for d in spec.dense] == \
        {"stack": ["relu", "softmax"], "dense": ["sigmoid"], "none": []}[tagger.head]
    batched_and_alone_match(spec, inputs, engine, expected)


# The suite's longest tests, in two classes: `make test`'s parallel workers take one each; the
# other tests of a tagger go with its class, which has saved it and its outputs already.
RESET_BEFORE = [t for t in TAGGERS if not t.reset_after]
RESET_AFTER = [t for t in TAGGERS if t.reset_after]


class TestResetBeforeTaggers:
    @pytest.mark.parametrize("engine", VARIANT_ENGINES)
    @pytest.mark.parametrize("tagger", RESET_BEFORE, ids=[t.label for t in RESET_BEFORE])
    def test_keras2_taggers_match_tf_keras(self, tagger: Tagger, engine: str, workdir: str) -> None:
        matches_tf_keras(tagger, engine, workdir)

    def test_convert_writes_a_keras_file_that_keeps_keras2s_hard_sigmoid(self, tmp_path: Path,
                                                                          workdir: str) -> None:
        """`convert` saves the built model as .keras; it loads back in Keras' safe mode and in the
        service's own reader, as the same variant with the same numbers."""
        import json
        import shutil

        import keras

        from app.cli import main
        from app.formats.parity import ParityData, write_parity

        tagger = next(t for t in RESET_BEFORE if t.recurrent_activation == "hard_sigmoid")
        path, inputs, expected = saved(tagger, workdir)
        source = tmp_path / "source"
        source.mkdir()
        shutil.copy(path, source / "tagger.h5")
        write_parity(source / "parity.npz", ParityData("", inputs, expected, None, None))
        (source / "model.json").write_text(json.dumps({"artifact": "tagger.h5", "parity": {
            "file": "parity.npz", "ids": "features" if tagger.inputs == "features" else "ids",
            "tolerance": TOLERANCE}}))
        assert main(["convert", str(source), "--out", str(tmp_path / "out")]) == 0
        bundle = load_bundle(tmp_path / "out")
        assert bundle.spec.layers[0].variant == GRUVariant(False, "hard_sigmoid", tagger.activation)
        loaded = keras.saving.load_model(tmp_path / "out" / "model.keras", safe_mode=True)
        got = [loaded([s[None], np.ones((1, len(s)), bool)])[0].numpy()[0] for s in inputs]
        assert max_diff(got, expected) <= TOLERANCE

    def test_exports_carry_the_variant_the_stack_and_the_input_kind(self, tmp_path: Path,
                                                                     workdir: str) -> None:
        """The .npz (read by its documented layout), the ONNX file (in ONNX Runtime) and the
        SavedModel (in TensorFlow) of a feature model with Keras 2's GRU and a Dense stack give
        tf_keras' numbers."""
        import onnxruntime as ort
        import tensorflow as tf

        from app.lowering.exports import export
        from tests.reference import npz_engine

        tagger = next(t for t in RESET_BEFORE if t.inputs == "features" and t.head == "stack")
        path, inputs, expected = saved(tagger, workdir)
        spec = read_keras_h5(path, Architecture(), "tagger")
        with np.load(export(spec, "npz", tmp_path / "w.npz")) as data:
            arrays = {key: data[key] for key in data.files}
        assert "embeddings" not in arrays and {"dense0.kernel", "dense1.kernel"} <= arrays.keys()
        assert max_diff([npz_engine(arrays, s) for s in inputs], expected) <= TOLERANCE
        session = ort.InferenceSession(str(export(spec, "onnx", tmp_path / "m.onnx")),
                                       providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["features", "lengths"]
        got = [session.run(["outputs"], {"features": s[None], "lengths": np.array([len(s)], np.int32)})[0][0]
               for s in inputs]
        assert max_diff(got, expected) <= TOLERANCE
        loaded = tf.saved_model.load(str(export(spec, "savedmodel", tmp_path / "sm")))
        got = [loaded.serve([tf.constant(s[None]), tf.ones((1, len(s)), tf.bool)])[0].numpy()[0]
               for s in inputs]
        assert max_diff(got, expected) <= TOLERANCE

    def test_the_openvino_engine_refuses_other_variants_by_name(self, workdir: str) -> None:
        """``ENGINE=auto`` then serves such a model with the faster of the engines that run it (it
        skips a candidate that cannot be built)."""
        from app.engine.engine_choice import choose_engine
        from app.engine.engines import make_engine
        from app.errors import ModelError

        path, _, _ = saved(RESET_BEFORE[0], workdir)
        spec = read_keras_h5(path, Architecture(), "tagger")
        assert choose_engine("auto", spec, 1, [8], 4).engine.name in ("native", "onnxruntime")
        refused = r"engine runs cuDNN's GRU and LSTM only, not .*reset_after=False"
        with pytest.raises(ModelError, match=refused):
            make_engine("openvino", spec, 1, [8])


class TestResetAfterTaggers:
    @pytest.mark.parametrize("engine", VARIANT_ENGINES)
    @pytest.mark.parametrize("tagger", RESET_AFTER, ids=[t.label for t in RESET_AFTER])
    def test_keras2_taggers_match_tf_keras(self, tagger: Tagger, engine: str, workdir: str) -> None:
        matches_tf_keras(tagger, engine, workdir)


@pytest.mark.parametrize("engine", VARIANT_ENGINES)
def test_keras_2_0_config_without_reset_after_means_false(tmp_path: Path, engine: str) -> None:
    """Keras <= 2.1 wrote no reset_after key (its GRU had only the reset-before form) and
    stored a Sequential's layers as a bare list. tf_keras assumes True and refuses the file;
    the service reads False and serves Keras 2's numbers."""
    tagger = Tagger(False, "hard_sigmoid", merges=("concat",))
    model = build(tagger, seed=3)
    inputs = sequences(tagger, np.random.default_rng(4))
    expected = alone(model, inputs)
    path = tmp_path / "keras20.h5"
    model.save(path)
    as_keras_2_1(path)
    with pytest.raises(ValueError, match="reset_after"):
        tf_keras().models.load_model(path)
    spec = read_keras_h5(path, Architecture(), "old")
    assert spec.source.keras_version == "2.0.8"
    assert spec.layers[0].variant == GRUVariant(False, "hard_sigmoid", "tanh")
    batched, single = run_both_ways(spec, inputs, engine)
    assert max_diff(batched, expected) <= TOLERANCE and max_diff(single, batched) <= 1e-6


def test_keras_3_hard_sigmoid_would_be_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rebuilt with Keras 3's own hard_sigmoid (relu6(x + 3) / 6), the same model is silently
    wrong; the comparison with tf_keras catches it, and the builder's registered Keras 2
    function is exact."""
    import keras

    import app.lowering.keras_model as builder

    assert float(keras.activations.hard_sigmoid(np.float32(1.0))) == pytest.approx(2 / 3)
    assert float(builder.keras2_hard_sigmoid(np.float32(1.0))) == pytest.approx(0.7)
    tagger = Tagger(False, "hard_sigmoid", merges=("concat", None), head="none")
    model = build(tagger, seed=5)
    inputs = sequences(tagger, np.random.default_rng(6))
    expected = alone(model, inputs)
    model.save(tmp_path / "m.h5")
    spec = read_keras_h5(tmp_path / "m.h5", Architecture(), "m")
    exact = run_batched(one_bucket_runner(spec, inputs, "keras"), inputs)
    assert max_diff(exact, expected) <= TOLERANCE
    monkeypatch.setattr(builder, "gru_activation", lambda name: name)  # Keras 3's by name
    wrong = run_batched(one_bucket_runner(spec, inputs, "keras"), inputs)
    assert max_diff(wrong, expected) > 100 * TOLERANCE


@pytest.mark.parametrize("engine", VARIANT_ENGINES)
@pytest.mark.parametrize("reset_after", [False, True])
@pytest.mark.parametrize("recurrent_activation", GRU_ACTIVATIONS)
def test_generated_gru_files_match_numpy_reference(
        tmp_path: Path, engine: str, reset_after: bool, recurrent_activation: str) -> None:
    """Written by h5py from native weights, checked against the NumPy GRU from the equations."""
    if engine == "keras" and recurrent_activation not in ("hard_sigmoid", "sigmoid"):
        pytest.skip("the keras engine is checked on every activation against tf_keras above")
    index = GRU_ACTIVATIONS.index(recurrent_activation)
    variant = Variant(reset_after, recurrent_activation, CANDIDATES[-1 - index])
    rng = np.random.default_rng(index + 10 * reset_after)
    vocab = None if index % 2 else 20
    # Weights small enough that unbounded gates (linear, relu, elu...) stay finite over 12 steps.
    model = random_model(rng, vocab=vocab, width=5, units=4, layers=2, merge_mode="ave",
                         variant=variant, stack=((6, "tanh"),), scale=0.3)
    spec = read_keras_h5(write_full_model(tmp_path / "m.h5", model, cell="GRU"), Architecture(), "m")
    inputs = [rng.integers(0, 20, n) if vocab else rng.normal(0, 1, (n, 5)).astype(np.float32)
              for n in range(1, 13)]
    expected = [model.outputs(np.asarray(s)) for s in inputs]
    assert np.isfinite(np.concatenate(expected)).all()
    batched, single = run_both_ways(spec, [np.asarray(s) for s in inputs], engine)
    assert max_diff(batched, expected) <= TOLERANCE
    assert max_diff(single, batched) <= 1e-6


def test_reference_activations_are_keras_2s() -> None:
    """The NumPy reference's activations equal tf_keras' own, hard_sigmoid included."""
    import tensorflow as tf

    x = np.linspace(-6, 6, 97).astype(np.float32)
    for name, function in REFERENCE_ACTIVATIONS.items():
        keras2 = tf_keras().activations.get(name)(tf.constant(x)).numpy()
        np.testing.assert_allclose(function(x.astype(np.float64)), keras2, atol=2e-6, err_msg=name)


def test_weights_only_reset_after_false_file_needs_its_activations(tmp_path: Path) -> None:
    """A weights-only file stores no activations: a (3U,) bias needs them named, and then
    serves exactly (here Keras 2's defaults, hard_sigmoid / tanh)."""
    rng = np.random.default_rng(7)
    variant = Variant(False, "hard_sigmoid", "tanh")
    model = random_model(rng, vocab=None, width=4, units=3, layers=2, variant=variant,
                         stack=((5, "relu"),), head=3, head_activation="softmax")
    path = write_weights_only(tmp_path / "w.h5", model, cell="GRU")
    with pytest.raises(ModelError, match=r"its bias \(3\*units,\) is GRU\(reset_after=False\)"):
        read_keras_h5(path, Architecture(head_activations=["relu", "softmax"]), "w")
    with pytest.raises(ModelError, match="2 Dense layers; name each one's activation"):
        read_keras_h5(path, Architecture(gru={"recurrent_activation": "hard_sigmoid"}), "w")
    architecture = Architecture(gru={"recurrent_activation": "hard_sigmoid"},
                                head_activations=["relu", "softmax"], mask_value=0.0)
    spec = read_keras_h5(path, architecture, "w")
    assert spec.input == FeatureInput(4, 0.0)
    inputs = [rng.normal(0, 1, (n, 4)).astype(np.float32) for n in (1, 5, 9)]
    batched, _ = run_both_ways(spec, inputs, "onnxruntime")
    assert max_diff(batched, [model.outputs(s) for s in inputs]) <= TOLERANCE


def test_cudnngru_claims_stay_strict(tmp_path: Path) -> None:
    """Architecture hints never turn cuDNN weights into another GRU."""
    model = random_model(np.random.default_rng(8), vocab=10, width=4, units=3, layers=1)
    path = write_weights_only(tmp_path / "c.h5", model)  # CuDNNGRU layout
    architecture = Architecture(gru={"recurrent_activation": "hard_sigmoid"}, head_activation="softmax")
    spec = read_keras_h5(path, architecture, "c")
    assert spec.layers[0].variant.is_cudnn
