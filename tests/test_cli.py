"""The command line: inspect, convert -> serve -> verify, and exports run by their own runtimes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.cli import main
from app.formats.bundle import SUFFIXES, FileKind, file_kind
from tests.conftest import DEFAULT_MODEL, FIXTURES, ROOT, Server
from tests.helpers import ENGINES, max_diff, outputs
from tests.reference import npz_engine, random_model
from tests.test_sources import write_tf1_checkpoint

REFERENCE = DEFAULT_MODEL / "segmenter.ref.npz"


def test_inspect_reports_format_layers_and_conversion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(DEFAULT_MODEL / "segmenter.h5")]) == 0
    out = capsys.readouterr().out
    assert "keras_version: 2.21.0" in out
    assert "model_weights/bigru_1/bigru_1/forward_gru/kernel:0" in out and "(256, 384)" in out
    assert "servable: yes, as keras2-h5-model; conversion: cudnn-gru->keras-gru" in out
    assert re.search(r"bigru_1 +GRU\(128\) +bidirectional; reset_after=True, sigmoid / tanh +concat", out)
    assert re.search(r"embedding +tokens: 96 x 32", out)


def test_inspect_says_why_a_file_cannot_be_served(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert main(["inspect", str(broken)]) == 1
    assert "broken.h5" in capsys.readouterr().err


def test_python_m_app_help() -> None:
    result = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("inspect", "convert", "verify", "export"):
        assert command in result.stdout


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "segmenter"
    assert main(["convert", str(DEFAULT_MODEL), "--out", str(out)]) == 0
    return out


def example_of(kind: str, suffix: str, converted: Path, directory: Path) -> Path:
    """A real file of each kind the service reads, named with ``suffix``."""
    if kind == FileKind.KERAS_H5:
        return Path(shutil.copy(DEFAULT_MODEL / "segmenter.h5", directory / f"segmenter{suffix}"))
    if kind == FileKind.KERAS3:
        return converted / "model.keras"
    if kind == FileKind.SAFETENSORS:
        return FIXTURES / "segmenter.safetensors"
    model = random_model(np.random.default_rng(0), vocab=30, width=6, units=4, layers=1,
                         bidirectional=True, head=3, head_activation="sigmoid")
    return write_tf1_checkpoint(directory / "model.ckpt", model)


@pytest.mark.parametrize(("suffix", "kind"), [*SUFFIXES.items(), ("", FileKind.TF_CHECKPOINT)])
def test_every_file_kind_the_service_reads_is_inspectable(suffix: str, kind: FileKind, converted: Path,
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """inspect reads the file the way the service's readers do: every suffix they take."""
    path = example_of(kind, suffix, converted, tmp_path)
    assert file_kind(path) is kind
    status = main(["inspect", str(path)])
    captured = capsys.readouterr()
    assert "unreadable" not in captured.err, captured.err
    assert re.search(r"^tensor +shape +dtype$", captured.out, re.M), captured.out
    assert "servable: yes" in captured.out and status == 0, captured.out


def test_every_file_kind_has_an_inspect_example() -> None:
    assert {*SUFFIXES.values(), FileKind.TF_CHECKPOINT} == set(FileKind)


def test_convert_writes_a_ready_directory(converted: Path) -> None:
    files = sorted(p.name for p in converted.iterdir())
    assert files == ["integrity.json", "keras_outputs.npz", "model.json", "model.keras", "parity.npz",
                     "vocab.json"]
    manifest = json.loads((converted / "model.json").read_text())
    assert manifest["converted_from"]["conversion"] == "cudnn-gru->keras-gru"
    check = manifest["keras"]["check"]  # Keras' own run of model.keras against the GPU
    assert check["sequences"] == 32 and check["max_abs_diff_outputs"] <= 1e-4
    assert manifest["keras"]["conversion"]["peak_rss_mib"] > 0


def test_converted_directory_serves_gpu_outputs(converted: Path, gpu_reference: dict) -> None:
    server = Server({"MODEL_PATH": str(converted)})
    try:
        server.wait_until()
        meta = httpx.get(server.url + "/v1/model").json()
        assert meta["source"]["format"] == "keras3"
        assert meta["source"]["converted_from"]["format"] == "keras2-h5-model"
        assert meta["keras"]["conversion"]["how"] == "converted directory"
        assert meta["keras"]["path"] == str(converted / "model.keras")
        assert server.records("converting: ") == []  # served as it is
        assert meta["self_check"]["passed"] and meta["engine_vs_keras"]["passed"]
        sequences = [s.tolist() for s in gpu_reference["ids"]]
        body = httpx.post(server.url + "/infer", json={"sequences": sequences}, timeout=60).json()
        got = [np.asarray(o, np.float32) for o in body["outputs"]]
        assert max_diff(got, gpu_reference["probs_fp32"]) <= 1e-4
    finally:
        server.stop()


def test_a_damaged_converted_directory_is_refused(converted: Path, tmp_path: Path) -> None:
    copy = tmp_path / "converted"
    shutil.copytree(converted, copy)
    (copy / "vocab.json").write_text('["a"]')
    server = Server({"MODEL_PATH": str(copy)})
    assert server.process.wait(timeout=120) == 3
    assert "vocab.json: sha256 differs from integrity.json (corrupted)" in server.output()


@pytest.mark.parametrize("engine", ENGINES)
def test_converted_keras3_file_reproduces_the_gpu_on_each_engine(converted: Path, gpu_reference: dict,
                                                                 engine: str) -> None:
    from app.formats.bundle import load_bundle

    spec = load_bundle(converted).spec
    assert spec.source.format == "keras3"
    short = [i for i, n in enumerate(gpu_reference["lengths"]) if n <= 12]  # few shapes to compile
    got = outputs(spec, [gpu_reference["ids"][i].tolist() for i in short], engine)
    assert max_diff(got, [gpu_reference["probs_fp32"][i] for i in short]) <= 1e-4


def test_verify_prints_max_diff_per_output(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(converted)]) == 0
    out = capsys.readouterr().out
    assert "outputs" in out and "hidden" in out and "FAIL" not in out


def test_verify_against_tf32_outputs_needs_a_looser_tolerance(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["verify", str(DEFAULT_MODEL), "--reference", str(REFERENCE), "--outputs-key", "probs_tf32"]
    assert main(args) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main([*args, "--tolerance", "1e-2"]) == 0


def test_verify_with_the_keras_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU's sequences of up to 12 steps (two shapes to compile; the keras engine on all of
    them: test_engines)."""
    with np.load(REFERENCE) as data:
        lengths, ids, outputs, hidden = (data[key] for key in ("lengths", "ids", "probs_fp32", "hidden_fp32"))
    cuts = np.cumsum(lengths)[:-1]
    short = [i for i, n in enumerate(lengths) if n <= 12]
    assert len(short) == 4

    def kept(array: np.ndarray) -> np.ndarray:
        return np.concatenate([np.split(array, cuts)[i] for i in short])

    reference = tmp_path / "short.npz"
    np.savez(reference, ids=kept(ids), lengths=lengths[short], outputs=kept(outputs), hidden=kept(hidden))
    assert main(["verify", str(DEFAULT_MODEL), "--engine", "keras", "--reference", str(reference),
                 "--hidden-key", "hidden"]) == 0
    out = capsys.readouterr().out
    assert "outputs" in out and "hidden" in out and "FAIL" not in out


def split_reference() -> tuple[list[np.ndarray], list[np.ndarray]]:
    with np.load(REFERENCE) as data:
        cuts = np.cumsum(data["lengths"])[:-1]
        return np.split(data["ids"], cuts)[:6], np.split(data["probs_fp32"], cuts)[:6]


def test_exported_onnx_runs_in_onnxruntime(tmp_path: Path) -> None:
    import onnxruntime as ort

    assert main(["export", str(DEFAULT_MODEL), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids, expected = split_reference()
    got = [session.run(["outputs"], {"ids": s[None].astype(np.int32),
                                     "lengths": np.array([len(s)], np.int32)})[0][0] for s in ids]
    assert max_diff(got, expected) <= 1e-4


def test_exported_savedmodel_runs_in_tensorflow(tmp_path: Path) -> None:
    import tensorflow as tf

    assert main(["export", str(DEFAULT_MODEL), "--format", "savedmodel", "--out", str(tmp_path / "sm")]) == 0
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    ids, expected = split_reference()
    got = []
    for s in ids:
        outputs, _hidden = loaded.serve([tf.constant(s[None], tf.int32), tf.ones((1, len(s)), tf.bool)])
        got.append(outputs.numpy()[0])
    assert max_diff(got, expected) <= 1e-4


def test_exported_npz_follows_its_documented_layout(tmp_path: Path) -> None:
    assert main(["export", str(DEFAULT_MODEL), "--format", "npz", "--out", str(tmp_path / "w.npz")]) == 0
    with np.load(tmp_path / "w.npz") as data:
        arrays = {k: data[k] for k in data.files}
    assert arrays["layer1.backward.kernel"].shape == (256, 384)
    ids, expected = split_reference()
    assert max_diff([npz_engine(arrays, s) for s in ids], expected) <= 1e-4


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two servable models and a broken one, laid out as MODEL_REPOSITORY takes them."""
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(DEFAULT_MODEL, root / "segmenter" / "1")
    (root / "tagger" / "1").mkdir(parents=True)
    shutil.copy(FIXTURES / "legacy" / "A_bidir_cudnngru_model.h5", root / "tagger" / "1" / "model.h5")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    return root


def convert_repository(root: Path) -> subprocess.CompletedProcess[str]:
    """``python -m app convert`` as the init container runs it (the session's MODEL_CACHE_DIR)."""
    return subprocess.run([sys.executable, "-m", "app", "convert"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "MODEL_REPOSITORY": str(root)}, timeout=600)


def test_convert_fills_the_cache_with_every_version_and_names_the_failures(repository: Path) -> None:
    result = convert_repository(repository)
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert sorted(lines) == ["broken/1", "segmenter/1", "tagger/1"], result.stdout
    assert re.match(r"(converted|cache hit): ", lines["segmenter/1"])
    assert re.match(r"(converted|cache hit): ", lines["tagger/1"])
    assert lines["broken/1"].startswith(f"failed: {repository / 'broken' / '1' / 'model.h5'}: ")
    assert result.returncode == 1 and "error: 1 of 3 versions failed: broken/1" in result.stderr


def test_a_repository_converted_ahead_starts_on_cache_hits(repository: Path, tmp_path: Path) -> None:
    root = tmp_path / "repository"
    shutil.copytree(repository, root, ignore=lambda directory, _: ["broken"] if Path(directory) == repository
                    else [])
    result = convert_repository(root)
    assert result.returncode == 0, result.stderr
    assert "2 versions of 2 models in the cache" in result.stderr
    server = Server({"MODEL_REPOSITORY": str(root)})
    try:
        server.wait_until(timeout=120)
        assert server.records("converting: ") == []  # the init container did it
        assert len(server.records("cache hit, no conversion: ")) == 2
        models = httpx.get(server.url + "/v1/models").json()["models"]
        assert [(m["name"], m["versions"]) for m in models] == [
            ("segmenter", [{"version": 1, "state": "READY"}]), ("tagger", [{"version": 1, "state": "READY"}])]
    finally:
        server.stop()
