"""The LSTM family, every source against an independent reference, <= 1e-5:

- Keras 2 / TF 1.x ``CuDNNLSTM`` (full model and weights-only, every merge mode, stacked, layer
  widths != input width) against tf_keras's own CuDNNLSTM -> LSTM load converter;
- Keras 2 / tf.keras ``LSTM`` with its activations (Keras 2's hard_sigmoid included) against
  tf_keras itself; Keras 3 ``.keras`` LSTMs against Keras 3;
- PyTorch ``nn.LSTM`` state dicts against PyTorch's own CPU outputs (fixtures recorded in an
  environment of their own: torch is not in the pinned set) and, with TF 1.x ``CudnnLSTM``
  checkpoints, a mixed GRU + LSTM stack and h5py-written files, against the NumPy LSTM of
  tests/reference.py (itself checked against tf_keras here).

Each is run through the project's runner on every engine that serves it, all sequences
batched in one call and each alone. No GPU was at hand: the references are CPU ones.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from app.errors import ModelError
from app.formats.bundle import load_bundle
from app.formats.keras_h5 import read_keras_h5
from app.formats.manifest import Architecture
from app.spec import CUDNN, CUDNN_LSTM, LSTMVariant, ModelSpec
from tests.conftest import FIXTURES
from tests.helpers import ENGINES, VARIANT_ENGINES, max_diff, runner_for, tf_keras
from tests.keras2_files import write_full_model, write_weights_only
from tests.keras2_lstm import LSTMTagger, Saved, save
from tests.reference import (
    CUDNN_LSTM as REFERENCE_CUDNN_LSTM,
)
from tests.reference import (
    NativeModel,
    Variant,
    random_model,
    run_lstm,
    to_keras_lstm,
)
from tests.test_sources import torch_state, write_dir, write_tf1_checkpoint

TOLERANCE = 1e-5
LENGTHS = list(range(1, 13))  # MAX_LEN of these tests; the served test goes to 600


def run_both_ways(spec: ModelSpec, inputs: list[np.ndarray], engine: str
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """All sequences in one call (the runner batches them), and each on its own; one length
    bucket keeps the keras engine to two compiled shapes."""
    runner = runner_for(spec, engine, max_batch_size=len(inputs), buckets=[max(len(s) for s in inputs)])
    batched = [outputs for outputs, _ in runner.run(inputs)]
    single = [runner.run([s])[0][0] for s in inputs]
    return batched, single


def assert_exact(spec: ModelSpec, inputs: list[np.ndarray], expected: list[np.ndarray], engine: str) -> float:
    batched, single = run_both_ways(spec, inputs, engine)
    worst = max_diff(batched, expected)
    assert worst <= TOLERANCE
    assert max_diff(single, batched) <= 1e-6
    return worst


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lstm")


@cache
def saved(tagger: LSTMTagger, directory: Path, weights_only: bool = False) -> Saved:
    kind = "weights" if weights_only else "model"
    return save(tagger, directory / f"{abs(hash(tagger))}-{kind}.h5", LENGTHS, weights_only)


# --- Keras 2 / TF 1.x CuDNNLSTM --------------------------------------------------------------

CUDNN_TAGGERS = [LSTMTagger(inputs="tokens", head="stack"),
                 LSTMTagger(inputs="features", head="dense", units=(3, 5, 4, 2, 6))]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tagger", CUDNN_TAGGERS, ids=[t.inputs for t in CUDNN_TAGGERS])
def test_cudnnlstm_full_models_match_tf_keras_conversion(tagger: LSTMTagger, engine: str,
                                                         workdir: Path) -> None:
    """Every merge mode and a unidirectional layer in one stack, each layer its own width."""
    if engine == "keras" and tagger.inputs == "features":
        pytest.skip("the keras engine runs the token model; the Keras model itself is checked "
                    "at start-up in the served test")
    model = saved(tagger, workdir)
    spec = read_keras_h5(model.path, Architecture(), "tagger")
    assert (spec.source.format, spec.source.conversion) == ("keras2-h5-model", "cudnn-lstm->keras-lstm")
    assert {layer.variant for layer in spec.layers} == {CUDNN_LSTM}
    assert [layer.units for layer in spec.layers] == list(tagger.units)
    assert [layer.merge_mode if layer.bidirectional else None for layer in spec.layers] == list(tagger.merges)
    assert spec.input.kind == tagger.inputs
    assert_exact(spec, model.inputs, model.expected, engine)


@pytest.mark.parametrize("merge_mode", ["ave"])
def test_cudnnlstm_weights_only_files_with_architecture_hints(merge_mode: str, workdir: Path) -> None:
    """``save_weights`` stores no architecture: the merge mode and Dense activations come from
    the architecture file; a CuDNNLSTM's (8U,) bias needs no activations named."""
    tagger = LSTMTagger(merges=(merge_mode, merge_mode), units=(4, 3), head="stack")
    model = saved(tagger, workdir, weights_only=True)
    with pytest.raises(ModelError, match="2 Dense layers; name each one's activation"):
        read_keras_h5(model.path, Architecture(merge_mode=merge_mode), "w")
    architecture = Architecture(merge_mode=merge_mode, head_activations=["relu", "softmax"])
    spec = read_keras_h5(model.path, architecture, "w")
    assert spec.source.format == "keras2-h5-weights"
    assert {layer.variant for layer in spec.layers} == {CUDNN_LSTM}
    assert_exact(spec, model.inputs, model.expected, "onnxruntime")


def test_the_kernel_bytes_rule_matters(workdir: Path) -> None:
    """The first layer's input kernels taken as stored (no (in, units) -> (units, in) byte
    reinterpretation) make the same file visibly wrong: the rule is what makes it exact."""
    from dataclasses import replace

    import h5py

    model = saved(LSTMTagger(inputs="features", merges=("concat",), units=(4,), head="none"), workdir)
    spec = read_keras_h5(model.path, Architecture(), "tagger")
    first = spec.layers[0]
    with h5py.File(model.path) as file:
        group = file["model_weights/bilstm_0/bilstm_0"]
        forward, backward = (replace(weights, kernel=np.asarray(group[f"{d}_lstm_0/kernel:0"]))
                             for d, weights in (("forward", first.forward), ("backward", first.backward)))
    plain = replace(spec, layers=(replace(first, forward=forward, backward=backward), *spec.layers[1:]))
    wrong, _ = run_both_ways(plain, model.inputs, "onnxruntime")
    assert max_diff(wrong, model.expected) > 100 * TOLERANCE


# --- Keras 2 / tf.keras LSTM, Keras 3 LSTM ----------------------------------------------------

TWO = {"merges": ("sum", None), "units": (4, 3)}
KERAS_TAGGERS = [
    LSTMTagger("LSTM", "sigmoid", "tanh", inputs="tokens", head="stack", **TWO),  # tf.keras 2's default
    LSTMTagger("LSTM", "hard_sigmoid", "tanh", inputs="features", head="dense", masking=True,
               merges=("concat", "mul"), units=(3, 5)),  # Keras 2's default
    LSTMTagger("LSTM", "elu", "softsign", inputs="tokens", head="none", **TWO),
]


@pytest.mark.parametrize("engine", VARIANT_ENGINES)
@pytest.mark.parametrize("tagger", KERAS_TAGGERS, ids=[t.label for t in KERAS_TAGGERS])
def test_keras2_lstm_files_match_tf_keras(tagger: LSTMTagger, engine: str, workdir: Path) -> None:
    if engine == "keras" and tagger.recurrent_activation != "hard_sigmoid":
        pytest.skip("the keras engine is checked on Keras 2's hard_sigmoid, the one it must register "
                    "(and on cuDNN's LSTM above)")
    model = saved(tagger, workdir)
    spec = read_keras_h5(model.path, Architecture(), "tagger")
    assert spec.source.conversion == "none (Keras LSTM layout)"
    assert {layer.variant for layer in spec.layers} == {
        LSTMVariant(tagger.recurrent_activation, tagger.activation)}
    assert_exact(spec, model.inputs, model.expected, engine)


def test_a_cudnn_lstm_variant_runs_on_openvino_too(workdir: Path) -> None:
    """tf.keras 2's LSTM is cuDNN's equations: OpenVINO serves it; Keras 2's is refused there."""
    from app.engine.engine_choice import choose_engine
    from app.engine.engines import make_engine

    model = saved(KERAS_TAGGERS[0], workdir)
    assert_exact(read_keras_h5(model.path, Architecture(), "t"), model.inputs, model.expected, "openvino")
    spec = read_keras_h5(saved(KERAS_TAGGERS[1], workdir).path, Architecture(), "t")
    with pytest.raises(ModelError, match=r"engine runs cuDNN's GRU and LSTM only, not .*hard_sigmoid"):
        make_engine("openvino", spec, 1, [8])
    assert choose_engine("auto", spec, 1, [8], 4).engine.name in ("native", "onnxruntime")


def test_weights_only_keras_lstm_needs_its_activations(tmp_path: Path) -> None:
    """A (4U,) bias is a Keras LSTM, whose activations differ by Keras version: they must be
    named; then it serves exactly."""
    rng = np.random.default_rng(3)
    variant = Variant(recurrent_activation="hard_sigmoid", cell="LSTM")
    model = random_model(rng, vocab=None, width=5, units=(4, 3), layers=2, variant=variant, head=3,
                         merge_mode="ave")
    path = write_weights_only(tmp_path / "w.h5", model, cell="LSTM")
    with pytest.raises(ModelError, match=r"its bias \(4\*units,\) is a Keras LSTM, whose activations"):
        read_keras_h5(path, Architecture(merge_mode="ave"), "w")
    spec = read_keras_h5(path, Architecture(merge_mode="ave", lstm={"recurrent_activation": "hard_sigmoid"},
                                            head_activation="softmax"), "w")
    assert {layer.variant for layer in spec.layers} == {LSTMVariant("hard_sigmoid", "tanh")}
    inputs = [rng.normal(0, 1, (n, 5)).astype(np.float32) for n in LENGTHS]
    assert_exact(spec, inputs, [model.outputs(s) for s in inputs], "onnxruntime")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_keras3_lstm_archives_match_keras3(tmp_path: Path, bidirectional: bool) -> None:
    import keras

    from app.formats.keras3 import read_keras3

    rng = np.random.default_rng(4)
    inputs_layer = keras.Input((None, 5), name="features")
    x = inputs_layer
    for index, units in enumerate((4, 3)):
        lstm = keras.layers.LSTM(units, return_sequences=True, name=f"lstm_{index}")
        x = keras.layers.Bidirectional(lstm, merge_mode="sum", name=f"bi_{index}")(x) if bidirectional \
            else lstm(x)
    x = keras.layers.Dense(3, activation="softmax", name="tags")(x)
    model = keras.Model(inputs_layer, x)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(tmp_path / "m.keras")
    inputs = [rng.normal(0, 1, (n, 5)).astype(np.float32) for n in LENGTHS]
    expected = [model(s[None]).numpy()[0] for s in inputs]
    spec = read_keras3(tmp_path / "m.keras", Architecture(), "m")
    assert [layer.cell for layer in spec.layers] == ["LSTM", "LSTM"]
    assert_exact(spec, inputs, expected, "openvino" if bidirectional else "onnxruntime")


# --- the NumPy reference, PyTorch, TF 1.x, mixed stacks ---------------------------------------

def test_reference_lstm_is_tf_kerass_lstm() -> None:
    """The NumPy LSTM (from cuDNN's equations) equals tf_keras' LSTM on Keras-layout weights."""
    rng = np.random.default_rng(5)
    native = random_model(rng, vocab=None, width=5, units=4, layers=1, bidirectional=False,
                          variant=REFERENCE_CUDNN_LSTM, head=None).layers[0][0]
    layer = tf_keras().layers.LSTM(4, return_sequences=True)
    x = rng.normal(0, 1, (1, 30, 5)).astype(np.float32)
    layer(x)
    layer.set_weights(list(to_keras_lstm(native)))
    np.testing.assert_allclose(run_lstm(native, x[0]), layer(x).numpy()[0], atol=1e-6)


def torch_lstm_state(model: NativeModel) -> dict:
    return torch_state(model, gru="lstm")


@pytest.mark.parametrize(("engine", "layers", "bidirectional", "vocab"), [
    ("onnxruntime", 1, False, 30), ("onnxruntime", 2, True, 30), ("onnxruntime", 2, False, None),
    ("openvino", 2, True, None),
])
def test_torch_lstm_state_dicts_match_numpy_reference(tmp_path: Path, engine: str, layers: int,
                                                      bidirectional: bool, vocab: int | None) -> None:
    rng = np.random.default_rng(layers * 7 + bidirectional)
    model = random_model(rng, vocab=vocab, width=6, units=4, layers=layers, bidirectional=bidirectional,
                         variant=REFERENCE_CUDNN_LSTM, head=3, head_activation="sigmoid")
    save_file(torch_lstm_state(model), str(tmp_path / "m.safetensors"))
    write_dir(tmp_path, "m.safetensors", architecture={
        "head_activation": "sigmoid", "input": "features" if vocab is None else "tokens"})
    spec = load_bundle(tmp_path).spec
    assert spec.source.conversion == "torch-lstm->keras-lstm"
    assert [(layer.cell, layer.bidirectional) for layer in spec.layers] == [("LSTM", bidirectional)] * layers
    inputs = [rng.integers(0, vocab, n) if vocab else rng.normal(0, 1, (n, 6)) for n in LENGTHS]
    inputs = [np.asarray(s, spec.input.dtype) for s in inputs]
    assert_exact(spec, inputs, [model.outputs(s) for s in inputs], engine)


def test_torch_lstm_with_a_projection_is_refused_by_name(tmp_path: Path) -> None:
    model = random_model(np.random.default_rng(6), vocab=10, width=4, units=4, layers=1,
                         variant=REFERENCE_CUDNN_LSTM, head=None)
    state = torch_lstm_state(model) | {"lstm.weight_hr_l0": np.zeros((2, 4), np.float32)}
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(ModelError, match=r"nn.LSTM with proj_size > 0 \(lstm.weight_hr_l0 projects h"):
        load_bundle(tmp_path / "m.safetensors")


@pytest.mark.parametrize(("engine", "layers", "bidirectional", "vocab"), [
    ("onnxruntime", 2, False, 25), ("onnxruntime", 2, True, None), ("openvino", 2, True, 25),
])
def test_tf1_cudnnlstm_checkpoints_match_numpy_reference(tmp_path: Path, engine: str, layers: int,
                                                         bidirectional: bool, vocab: int | None) -> None:
    """TF's i, c, f, o order read back as i, f, c, o: a swap missed would be visibly wrong."""
    rng = np.random.default_rng(layers + 10 * bidirectional)
    model = random_model(rng, vocab=vocab, width=5, units=3, layers=layers, bidirectional=bidirectional,
                         variant=REFERENCE_CUDNN_LSTM)
    write_tf1_checkpoint(tmp_path / "model.ckpt", model)
    write_dir(tmp_path, "model.ckpt", architecture={
        "head_activation": "softmax", "input": "features" if vocab is None else "tokens"})
    spec = load_bundle(tmp_path).spec
    assert (spec.source.format, spec.source.conversion) == ("tf1-cudnnlstm-checkpoint",
                                                            "tf1-canonical-lstm->keras-lstm")
    inputs = [rng.integers(0, vocab, n) if vocab else rng.normal(0, 1, (n, 5)) for n in LENGTHS]
    inputs = [np.asarray(s, spec.input.dtype) for s in inputs]
    assert_exact(spec, inputs, [model.outputs(s) for s in inputs], engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_mixed_gru_and_lstm_stack(tmp_path: Path, engine: str) -> None:
    """A CuDNNGRU layer, then a CuDNNLSTM, then a unidirectional CuDNNLSTM: one spec, one graph."""
    rng = np.random.default_rng(9)
    model = random_model(rng, vocab=20, width=6, units=(4, 3, 5), layers=3,
                         variants=(Variant(), REFERENCE_CUDNN_LSTM, REFERENCE_CUDNN_LSTM),
                         merge_modes=("concat", "mul", "sum"), head=3)
    model.layers[2] = (model.layers[2][0], None)  # "sum" kept the head's width: U
    path = write_full_model(tmp_path / "m.h5", model, cell=("CuDNNGRU", "CuDNNLSTM", "CuDNNLSTM"))
    spec = read_keras_h5(path, Architecture(), "mixed")
    assert [layer.variant for layer in spec.layers] == [CUDNN, CUDNN_LSTM, CUDNN_LSTM]
    assert spec.source.conversion == "cudnn-gru->keras-gru, cudnn-lstm->keras-lstm"
    assert [r["type"] for r in spec.describe()["recurrent"]] == ["GRU", "LSTM", "LSTM"]
    inputs = [rng.integers(0, 20, n).astype(np.int32) for n in LENGTHS]
    assert_exact(spec, inputs, [model.outputs(s) for s in inputs], engine)
    runner = runner_for(spec, "onnxruntime", max_len=16)
    hidden = [h for _, h in runner.run(inputs)]
    assert max_diff(hidden, [model.hidden(s) for s in inputs]) <= TOLERANCE


def test_exports_of_an_lstm_model(tmp_path: Path, workdir: Path) -> None:
    """The .npz read by its documented layout and the ONNX file in ONNX Runtime give tf_keras'
    numbers for a CuDNNLSTM model."""
    import onnxruntime as ort

    from app.lowering.exports import export
    from tests.reference import npz_engine

    model = saved(CUDNN_TAGGERS[1], workdir)
    spec = read_keras_h5(model.path, Architecture(), "tagger")
    with np.load(export(spec, "npz", tmp_path / "w.npz")) as data:
        arrays = {key: data[key] for key in data.files}
    assert arrays["layer0.forward.bias"].shape == (4 * spec.layers[0].units,)
    assert max_diff([npz_engine(arrays, s) for s in model.inputs], model.expected) <= TOLERANCE
    session = ort.InferenceSession(str(export(spec, "onnx", tmp_path / "m.onnx")),
                                   providers=["CPUExecutionProvider"])
    got = [session.run(["outputs"], {"features": s[None], "lengths": np.array([len(s)], np.int32)})[0][0]
           for s in model.inputs]
    assert max_diff(got, model.expected) <= TOLERANCE


# --- what is refused, and how it is said -------------------------------------------------------

def _lstm_config(**config: object) -> dict:
    lstm = {"class_name": "LSTM", "config": {"name": "lstm", "units": 3, "return_sequences": True,
                                             "recurrent_activation": "sigmoid", "activation": "tanh",
                                             **config}}
    return {"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "InputLayer", "config": {"batch_input_shape": [None, None, 4], "name": "x"}},
        {"class_name": "Bidirectional", "config": {"name": "bi", "layer": lstm, "merge_mode": "concat"}}]}}


@pytest.mark.parametrize(("config", "message"), [
    (_lstm_config(stateful=True), r"layer 'bi' \(LSTM\): unsupported return_state/stateful"),
    (_lstm_config(activation="selu"), r"layer 'bi' \(LSTM\): unsupported activation='selu'"),
    (_lstm_config(use_bias=False), r"layer 'bi' \(LSTM\): unsupported use_bias=False"),
    (_lstm_config(return_sequences=False), r"layer 'bi' \(LSTM\): unsupported return_sequences=False"),
    ({"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "RNN", "config": {"name": "peephole", "cell": {"class_name": "PeepholeLSTMCell"}}}]}},
     r"layer 'peephole': RNN is not supported"),
])
def test_unservable_lstms_are_refused_naming_the_layer(tmp_path: Path, config: dict, message: str) -> None:
    import json

    from app.formats.keras_config import parse_model_config

    with pytest.raises(ModelError, match=message):
        parse_model_config(json.dumps(config))


def test_a_cudnnlstm_claim_needs_cudnns_bias(tmp_path: Path) -> None:
    """A file that says CuDNNLSTM but holds a Keras LSTM's (4U,) bias is refused, not guessed."""
    model = random_model(np.random.default_rng(10), vocab=10, width=4, units=3, layers=1,
                         variant=REFERENCE_CUDNN_LSTM, head=None)
    from tests.keras2_files import model_config

    config = model_config(model, "CuDNNLSTM")
    path = write_full_model(tmp_path / "m.h5", model, cell="LSTM", config=config)
    with pytest.raises(ModelError, match=r"claims CuDNNLSTM but its bias has shape \(12,\)"):
        read_keras_h5(path, Architecture(), "m")


def test_inspect_describes_an_lstm_file(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    model = saved(CUDNN_TAGGERS[0], workdir)
    assert main(["inspect", str(model.path)]) == 0
    out = capsys.readouterr().out
    assert "servable: yes, as keras2-h5-model; conversion: cudnn-lstm->keras-lstm" in out
    assert "LSTM(4)" in out and "bidirectional; sigmoid / tanh" in out and "forward; sigmoid / tanh" in out


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", ["tokens_bi", "features_uni"])
def test_torch_lstm_fixtures_reproduce_pytorch(name: str, engine: str) -> None:
    """State dicts of nn.LSTM modules (2 layers; bidirectional with batch_first, unidirectional
    without) and what PyTorch 2.13's CPU nn.LSTM computed, recorded by
    tests/fixtures/torch_lstm/record.py in an environment of its own."""
    if engine == "keras" and name == "features_uni":
        pytest.skip("the keras engine runs the bidirectional token model")
    bundle = load_bundle(FIXTURES / "torch_lstm" / name)
    assert bundle.parity is not None and bundle.spec.source.conversion == "torch-lstm->keras-lstm"
    assert [layer.cell for layer in bundle.spec.layers] == ["LSTM", "LSTM"]
    assert_exact(bundle.spec, bundle.parity.sequences, bundle.parity.outputs, engine)


def test_a_manual_cudnnlstm_pair_between_reversing_lambdas(tmp_path: Path) -> None:
    """Keras 2's hand-made bidirectional layer: one CuDNNLSTM on the input, one between two
    ``Lambda(reverse)`` layers, joined by ``Concatenate``; the Lambdas are recognised, never run."""
    from tf_keras.src.layers import CuDNNLSTM

    keras2 = tf_keras()
    layers = keras2.layers

    def build(cell: type) -> object:
        ids = layers.Input((None,), name="ids")
        x = layers.Embedding(15, 5, name="embedding")(ids)
        forward = cell(4, return_sequences=True, name="forward")(x)
        reverse = layers.Lambda(_reverse_steps, name="reverse_in")(x)
        backward = cell(4, return_sequences=True, name="backward")(reverse)
        backward = layers.Lambda(_reverse_steps, name="reverse_out")(backward)
        merged = layers.Concatenate(name="merge")([forward, backward])
        return keras2.Model(ids, layers.Dense(3, activation="softmax", name="tags")(merged))

    model = build(CuDNNLSTM)
    rng = np.random.default_rng(11)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    model.save(tmp_path / "pair.h5")
    twin = build(layers.LSTM)
    twin.load_weights(tmp_path / "pair.h5")
    inputs = [rng.integers(0, 15, n).astype(np.int32) for n in LENGTHS]
    expected = [twin(s[None]).numpy()[0] for s in inputs]
    spec = read_keras_h5(tmp_path / "pair.h5", Architecture(), "pair")
    assert [(layer.name, layer.cell, layer.merge_mode) for layer in spec.layers] == [
        ("forward+backward", "LSTM", "concat")]
    assert_exact(spec, inputs, expected, "onnxruntime")


def _reverse_steps(tensor: object) -> object:
    """A Keras 2 Lambda's body (saved as marshalled code; the service reads, never runs it)."""
    import tf_keras

    return tf_keras.backend.reverse(tensor, 1)
