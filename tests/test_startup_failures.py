"""A file that can't be served stops start-up with one message naming the problem."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import httpx
import numpy as np
import pytest

from app.errors import ModelError
from app.formats.bundle import load_bundle
from tests.conftest import DEFAULT_MODEL, FIXTURES, ROOT, Server, converted_copy
from tests.keras2_files import model_config, write_full_model
from tests.reference import random_model


def small_model(tmp_path: Path, mutate_config=None, mutate_file=None) -> Path:
    model = random_model(np.random.default_rng(0), vocab=10, width=5, units=3, layers=1)
    config = model_config(model)
    if mutate_config:
        mutate_config(config["config"]["layers"])
    path = write_full_model(tmp_path / "model.h5", model, config=config)
    if mutate_file:
        with h5py.File(path, "a") as file:
            mutate_file(file)
    return path


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "truncated.h5"
    path.write_bytes((DEFAULT_MODEL / "segmenter.h5").read_bytes()[:400_000])
    with pytest.raises(ModelError, match=r"truncated\.h5.*(truncated|unreadable)"):
        load_bundle(path)


def test_not_hdf5_at_all(tmp_path: Path) -> None:
    path = tmp_path / "model.h5"
    path.write_text("this is not a model")
    with pytest.raises(ModelError, match="not a readable HDF5 file"):
        load_bundle(path)


def test_wrong_shape_names_layer_and_dataset(tmp_path: Path) -> None:
    def shrink(file: h5py.File) -> None:
        group = file["model_weights/bigru_0"]
        name = "bigru_0/backward_cu_dnngru/recurrent_kernel:0"
        del group[name]
        group.create_dataset(name, data=np.zeros((3, 8), np.float32))

    with pytest.raises(ModelError, match=r"layer 'bigru_0' \(backward\).*recurrent_kernel.*\(3, 8\)"):
        load_bundle(small_model(tmp_path, mutate_file=shrink))


def test_head_kernel_that_does_not_fit(tmp_path: Path) -> None:
    def widen(file: h5py.File) -> None:
        group = file["model_weights/head"]
        del group["head/kernel:0"]
        group.create_dataset("head/kernel:0", data=np.zeros((7, 5), np.float32))

    with pytest.raises(ModelError, match=r"head: kernel has shape \(7, 5\), expected \(6, units\)"):
        load_bundle(small_model(tmp_path, mutate_file=widen))


def test_unsupported_layer(tmp_path: Path) -> None:
    def add_rnn(layers: list) -> None:
        layers.insert(3, {"class_name": "SimpleRNN", "config": {"name": "rnn", "units": 3}})

    with pytest.raises(ModelError, match="layer 'rnn': SimpleRNN is not supported"):
        load_bundle(small_model(tmp_path, add_rnn))


def test_a_gru_config_contradicting_its_cudnn_weights_is_refused(tmp_path: Path) -> None:
    """cuDNN-layout weights always run cuDNN's GRU: a config saying otherwise is refused."""
    def plain_gru(layers: list) -> None:
        layers[2]["config"]["layer"] = {"class_name": "GRU", "config": {
            "name": "gru", "units": 3, "return_sequences": True, "reset_after": False}}

    with pytest.raises(ModelError, match=r"layer 'bigru_0': its weights are cuDNN's layout, which "
                       r"always runs cuDNN's GRU, but the architecture says GRU\(reset_after=False"):
        load_bundle(small_model(tmp_path, plain_gru))


@pytest.mark.parametrize(("activation", "problem"), [
    ("selu", "recurrent_activation='selu' (supported: sigmoid, hard_sigmoid"),
    ("swish", "recurrent_activation='swish'"),
])
def test_gru_activations_no_engine_computes_exactly_are_refused(
        tmp_path: Path, activation: str, problem: str) -> None:
    def unsupported(layers: list) -> None:
        layers[2]["config"]["layer"] = {"class_name": "GRU", "config": {
            "name": "gru", "units": 3, "return_sequences": True, "reset_after": True,
            "recurrent_activation": activation}}

    with pytest.raises(ModelError, match=re.escape(f"layer 'bigru_0' (GRU): unsupported {problem}")):
        load_bundle(small_model(tmp_path, unsupported))


def test_cudnn_claim_with_keras_bias_is_refused(tmp_path: Path) -> None:
    def keras_bias(file: h5py.File) -> None:
        group = file["model_weights/bigru_0"]
        for direction in ("forward", "backward"):
            name = f"bigru_0/{direction}_cu_dnngru/bias:0"
            del group[name]
            group.create_dataset(name, data=np.zeros((2, 9), np.float32))

    with pytest.raises(ModelError, match=r"claims CuDNNGRU but its bias has shape \(2, 9\)"):
        load_bundle(small_model(tmp_path, mutate_file=keras_bias))


def test_last_gru_without_return_sequences_is_refused(tmp_path: Path) -> None:
    def last_only(layers: list) -> None:
        layers[2]["config"]["layer"]["config"]["return_sequences"] = False

    with pytest.raises(ModelError, match="return_sequences=False"):
        load_bundle(small_model(tmp_path, last_only))


def test_manual_pair_with_opaque_lambda_asks_for_directions(tmp_path: Path) -> None:
    source = FIXTURES / "legacy" / "B_manual_bidir_model.h5"
    path = tmp_path / "opaque.h5"
    shutil.copy(source, path)
    with h5py.File(path, "a") as file:
        config = json.loads(file.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "Lambda":
                layer["config"]["function"] = ["AAAA", None, None]  # code that names nothing
        file.attrs["model_config"] = json.dumps(config)
    with pytest.raises(ModelError, match=r"cannot tell which of .* runs backward.*directions"):
        load_bundle(path)


def test_server_refuses_to_start_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.h5"
    path.write_bytes((DEFAULT_MODEL / "segmenter.h5").read_bytes()[:100_000])
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "app.main:app", "--port", "0"],
        cwd=ROOT, env={"MODEL_PATH": str(path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 3
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    ours = [r for r in records if r["logger"].split(".")[0] == "app" and r["level"] == "ERROR"]
    assert len(ours) == 1, ours  # one line of ours names the file and the problem
    assert ours[0]["message"].startswith(f"cannot serve {path}: {path}: not a readable HDF5 file")
    assert records[-1] is ours[0]  # the last word: no traceback follows


def test_server_refuses_to_start_on_an_unreadable_tf1_checkpoint(tmp_path: Path) -> None:
    """Read only in the conversion's child process (TensorFlow): its message still reaches the log."""
    (tmp_path / "model.ckpt.index").write_bytes(b"not a checkpoint index")
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(b"\0" * 64)
    (tmp_path / "model.json").write_text(json.dumps({"artifact": "model.ckpt"}))
    server = Server({"MODEL_PATH": str(tmp_path), "MODEL_CACHE_DIR": str(tmp_path / "cache")})
    assert server.process.wait(timeout=180) == 3
    (line,) = [r["message"] for r in server.log_records() if r["level"] == "ERROR"]
    prefix = tmp_path / "model.ckpt"
    assert line.startswith(f"cannot serve {tmp_path}: {prefix}: not a readable TF checkpoint")


def test_a_conversion_past_its_time_limit_stops_start_up(tmp_path: Path) -> None:
    server = Server({"MODEL_CACHE_DIR": str(tmp_path / "cache"), "CONVERT_TIMEOUT_S": "0.5"})
    assert server.process.wait(timeout=120) == 3
    assert "the conversion took longer than CONVERT_TIMEOUT_S=0.5 s and was stopped" in server.output()
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []  # nothing half-written


def test_a_cache_it_cannot_write_stops_start_up_with_advice(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "a-file" / "cache"  # not creatable, even for root
    server = Server({"MODEL_CACHE_DIR": str(cache)})
    assert server.process.wait(timeout=120) == 3
    assert f"MODEL_CACHE_DIR {cache}: cannot convert into it" in server.output()


def _model_dir_with_tight_tolerance(tmp_path: Path, converted: Path) -> Path:
    return converted_copy(converted, tmp_path / "model", tolerance=1e-9)


def test_failed_self_check_keeps_the_service_not_ready(tmp_path: Path, default_converted: Path) -> None:
    server = Server({"MODEL_PATH": str(_model_dir_with_tight_tolerance(tmp_path, default_converted))})
    try:
        server.wait_until("/healthz")
        for _ in range(600):
            response = httpx.get(server.url + "/readyz")
            if response.json()["stage"] == "failed":
                break
            time.sleep(0.05)
        assert response.status_code == 503
        assert "self-check failed" in response.json()["error"]
        refused = httpx.post(server.url + "/infer", json={"sequences": [[2, 3]]})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
    finally:
        log = server.stop()
    assert "self-check failed" in log


def test_failed_self_check_exits_when_configured(tmp_path: Path, default_converted: Path) -> None:
    server = Server({"MODEL_PATH": str(_model_dir_with_tight_tolerance(tmp_path, default_converted)),
                     "EXIT_ON_FAILURE": "1"})
    assert server.process.wait(timeout=120) == 1
    assert "self-check failed" in server.output()
