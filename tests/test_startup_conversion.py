"""Start-up converts every source into a Keras 3 BiGRU in a child process, keeps it by content
hash, and serves the engine lowered from the saved ``.keras`` file; the serving process never
holds TensorFlow."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.convert.directory import verify_integrity
from app.formats.bundle import load_bundle
from app.formats.parity import ParityData
from tests.conftest import DEFAULT_MODEL, FIXTURES, ROOT, Server
from tests.helpers import max_diff
from tests.reference import random_model
from tests.test_sources import write_dir, write_tf1_checkpoint

GPU_PARITY = {"file": "segmenter.ref.npz", "outputs": "probs_fp32", "hidden": "hidden_fp32"}
CONVERSION_STEPS = ["reading", "building", "keras-check", "writing"]


def segmenter_dir(directory: Path, artifact: str) -> Path:
    """The GPU-trained segmenter's weights in another file format, with its GPU outputs."""
    shutil.copy(FIXTURES / artifact, directory)
    shutil.copy(DEFAULT_MODEL / "segmenter.ref.npz", directory)
    return write_dir(directory, artifact, architecture={"head_activation": "softmax"}, parity=GPU_PARITY)


def tf1_dir(directory: Path) -> Path:
    """A TF 1.x CudnnGRU checkpoint, with the NumPy cuDNN reference's outputs as parity data."""
    rng = np.random.default_rng(5)
    model = random_model(rng, vocab=25, width=5, units=3, layers=2)
    write_tf1_checkpoint(directory / "model.ckpt", model)
    sequences = [rng.integers(0, 25, n) for n in range(1, 13)]
    np.savez(directory / "parity.npz", ids=np.concatenate(sequences), lengths=[len(s) for s in sequences],
             outputs=np.concatenate([model.outputs(s) for s in sequences]).astype(np.float32))
    return write_dir(directory, "model.ckpt", architecture={"head_activation": "softmax"},
                     parity={"file": "parity.npz"})


SOURCES = {
    "cudnngru-h5": lambda directory: DEFAULT_MODEL,
    "weights-only-h5": lambda directory: segmenter_dir(directory, "segmenter_weights.h5"),
    "safetensors": lambda directory: segmenter_dir(directory, "segmenter.safetensors"),
    "tf1-checkpoint": tf1_dir,
}


def serve_once(env: dict[str, str]) -> tuple[dict, Server, str]:
    """Start ``python -m app serve`` until ready; returns /v1/model (with the ``stages`` that
    /readyz reported on the way), the stopped server, and its memory map while serving."""
    server = Server({"DRAIN_DELAY_S": "0", **env}, argv=("tests/module_report_serve.py",))
    stages: list[str] = []
    try:
        server.wait_until("/healthz", timeout=60)
        for _ in range(3000):
            readyz = httpx.get(server.url + "/readyz").json()
            if readyz["stage"] == "converting" and "converting" not in stages:
                converting = httpx.get(server.url + "/v1/model").json()  # answers meanwhile
                assert converting["state"] == "LOADING" and "architecture" not in converting
            if not stages or stages[-1] != readyz["stage"]:
                stages.append(readyz["stage"])
            if readyz["ready"] or readyz["stage"] == "failed":
                break
            time.sleep(0.1)
        server.wait_until(timeout=10)
        meta = httpx.get(server.url + "/v1/model").json()
        maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    finally:
        server.stop()
    return {**meta, "stages": stages}, server, maps


def assert_no_tensorflow(server: Server, maps: str) -> None:
    assert "libtensorflow" not in maps and "_pywrap_tensorflow" not in maps
    imported = [r["imported"] for r in server.log_records() if "imported" in r]
    assert imported == ["onnxruntime"]  # the engine's library, and nothing of TensorFlow


def keras_reproduces(path: Path, parity: ParityData) -> float:
    """Load the file with Keras itself (safe mode), check it is a Bidirectional GRU model with
    cuDNN's equations, and return its max abs difference from the parity data."""
    import keras

    model = keras.saving.load_model(path, safe_mode=True)
    wrappers = [layer for layer in model.layers if isinstance(layer, keras.layers.Bidirectional)]
    assert wrappers, [type(layer).__name__ for layer in model.layers]
    for wrapper in wrappers:
        for gru in (wrapper.forward_layer, wrapper.backward_layer):
            assert isinstance(gru, keras.layers.GRU) and gru.reset_after
    sequences = parity.sequences
    ids = np.zeros((len(sequences), max(map(len, sequences))), np.int32)
    mask = np.zeros(ids.shape, bool)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)], mask[row, : len(sequence)] = sequence, True
    outputs, _hidden = model.predict_on_batch([ids, mask])
    return max_diff([outputs[row, : len(s)] for row, s in enumerate(sequences)], parity.outputs)


@pytest.mark.parametrize("source", SOURCES)
def test_start_up_serves_the_keras_model_it_converted(tmp_path: Path, source: str) -> None:
    (tmp_path / "model").mkdir()
    model_path = SOURCES[source](tmp_path / "model")
    cache = tmp_path / "cache"
    meta, server, maps = serve_once({"MODEL_PATH": str(model_path), "MODEL_CACHE_DIR": str(cache)})

    assert_no_tensorflow(server, maps)
    assert [r["step"] for r in server.records("converting: ")] == CONVERSION_STEPS
    assert "converting" in meta["stages"] and meta["stages"][-1] == "ready"
    keras_file = Path(meta["keras"]["path"])
    assert keras_file.name == "model.keras" and keras_file.parent.parent == cache
    assert meta["keras"]["conversion"]["how"] == "converted"
    assert meta["keras"]["keras_version"].startswith("3.")
    assert meta["keras"]["self_check"]["passed"] and meta["self_check"]["passed"]
    assert meta["engine_vs_keras"]["passed"] and meta["engine_vs_keras"]["tolerance"] == 1e-5
    verify_integrity(keras_file.parent)

    parity = load_bundle(model_path).parity
    assert parity is not None
    assert keras_reproduces(keras_file, parity) <= 1e-4
    print(f"time to ready, converting: {meta['status']['seconds_to_ready']:.2f} s")


def test_cache_hit_skips_the_conversion_and_a_corrupted_entry_is_redone(tmp_path: Path,
                                                                        default_converted: Path) -> None:
    # The cold start of this source: test_start_up_serves_the_keras_model_it_converted[cudnngru-h5].
    cache = tmp_path / "cache"
    entry = cache / default_converted.name
    shutil.copytree(default_converted, entry)
    env = {"MODEL_PATH": str(DEFAULT_MODEL), "MODEL_CACHE_DIR": str(cache)}
    files = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in entry.iterdir()}

    warm, server, maps = serve_once(env)
    assert warm["keras"]["conversion"]["how"] == "cache hit"
    assert warm["keras"]["path"] == str(entry / "model.keras")
    assert server.records("converting: ") == [] and server.records("cache hit")
    assert {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in entry.iterdir()} == files
    assert warm["self_check"]["passed"] and warm["engine_vs_keras"]["passed"]  # still checked
    assert_no_tensorflow(server, maps)
    print(f"time to ready: warm {warm['status']['seconds_to_ready']:.2f} s")

    keras_file = entry / "model.keras"
    damaged = bytearray(keras_file.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    keras_file.write_bytes(bytes(damaged))
    redone, server, _ = serve_once(env)
    assert redone["keras"]["conversion"]["how"] == "reconverted"
    (warning,) = server.records("cache entry unusable")
    assert "model.keras" in warning["message"] and "corrupted" in warning["message"]
    assert [r["step"] for r in server.records("converting: ")] == CONVERSION_STEPS
    assert redone["self_check"]["passed"] and redone["engine_vs_keras"]["passed"]
    verify_integrity(entry)


def test_replicas_sharing_a_cache_convert_once(tmp_path: Path) -> None:
    """Two converters started together on one cache: one converts, the other finds its result."""
    cache = tmp_path / "cache"
    env = {**os.environ, "MODEL_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    converters = [subprocess.Popen([sys.executable, "-m", "app", "convert", str(DEFAULT_MODEL)], cwd=ROOT,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                  for _ in range(2)]
    results = [converter.communicate(timeout=300)[0] for converter in converters]
    assert [converter.returncode for converter in converters] == [0, 0]
    assert sorted(result.split(":")[0] for result in results) == ["cache hit", "converted"]
    entries = [path for path in cache.iterdir() if path.is_dir()]
    assert len(entries) == 1, entries  # and no temporary directory left behind
    verify_integrity(entries[0])


def test_keras_engine_serves_the_saved_keras_model_itself(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    model_path = tf1_dir(tmp_path / "model")
    meta, _, maps = serve_once({"MODEL_PATH": str(model_path), "MODEL_CACHE_DIR": str(tmp_path / "cache"),
                                "ENGINE": "keras", "MAX_LEN": "16"})
    assert meta["engine"] == "keras-xla" and Path(meta["keras"]["path"]).is_file()
    assert meta["self_check"]["passed"] and meta["engine_vs_keras"]["passed"]
    assert "libtensorflow" in maps  # by choice: ENGINE=keras runs Keras in the server
