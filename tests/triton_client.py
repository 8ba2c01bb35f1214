"""Drive the service with the real ``tritonclient`` (HTTP or gRPC), as a user's program would.

Runs in its own virtualenv, ``.venv-client`` (``make install``): every tritonclient release pins
``protobuf < 7`` and ``ml-dtypes <= 0.5.4``, while the service's TensorFlow 2.21 environment has
protobuf 7 and ml-dtypes 0.6. tests/test_kserve.py runs it against a real server and checks
what it wrote:

    .venv-client/bin/python tests/triton_client.py http|grpc URL MODEL SEQUENCES.npz OUT_DIR

``SEQUENCES.npz`` holds ``ids`` (concatenated) and ``lengths``. ``OUT_DIR`` receives
``report.json`` (health, metadata, each malformed request's error) and ``tensors.npz`` (each
inference case's outputs, as the client decoded them).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

BATCH = 8


def padded(sequences: list[np.ndarray], dtype: type) -> tuple[np.ndarray, np.ndarray]:
    steps = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), steps), dtype=dtype)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
    return ids, np.array([len(s) for s in sequences], dtype=np.int32)


class Session:
    def __init__(self, protocol: str, url: str, model: str) -> None:
        self.protocol, self.model = protocol, model
        self.module: Any = httpclient if protocol == "http" else grpcclient
        self.client = self.module.InferenceServerClient(url)

    def tensor(self, name: str, array: np.ndarray, datatype: str, binary: bool = True) -> Any:
        tensor = self.module.InferInput(name, list(array.shape), datatype)
        if self.protocol == "http":
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        return tensor

    def wanted(self, names: list[str] | None, binary: bool = True) -> list[Any] | None:
        if names is None:
            return None
        if self.protocol == "http":
            return [self.module.InferRequestedOutput(name, binary_data=binary) for name in names]
        return [self.module.InferRequestedOutput(name) for name in names]

    def infer(self, inputs: list[Any], outputs: list[Any] | None = None, model: str | None = None) -> Any:
        return self.client.infer(model or self.model, inputs, outputs=outputs, request_id="req-7")

    def metadata(self) -> dict:
        if self.protocol == "http":
            return {"server": self.client.get_server_metadata(),
                    "model": self.client.get_model_metadata(self.model)}
        return {"server": self.client.get_server_metadata(as_json=True),
                "model": self.client.get_model_metadata(self.model, as_json=True)}


def inference_cases(session: Session, sequences: list[np.ndarray]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}

    def keep(case: str, result: Any) -> None:
        for name in ("outputs", "hidden"):
            value = result.as_numpy(name)
            if value is not None:
                arrays[f"{case}/{name}"] = value
        arrays[f"{case}/id"] = np.array(result.get_response(as_json=True)["id"]
                                        if session.protocol == "grpc" else result.get_response()["id"])

    single = max(sequences, key=len)[None, :].astype(np.int32)
    keep("single_int32_all_outputs", session.infer([session.tensor("ids", single, "INT32")]))
    ids, lengths = padded(sequences[:BATCH], np.int64)
    batch = [session.tensor("ids", ids, "INT64"), session.tensor("lengths", lengths, "INT32")]
    keep("batch_int64_binary", session.infer(batch, session.wanted(["outputs", "hidden"])))
    keep("batch_outputs_only", session.infer(batch, session.wanted(["outputs"])))
    if session.protocol == "http":
        ids32, lengths32 = padded(sequences[:BATCH], np.int32)
        json_batch = [session.tensor("ids", ids32, "INT32", binary=False),
                      session.tensor("lengths", lengths32, "INT32", binary=False)]
        keep("batch_int32_json", session.infer(json_batch, session.wanted(["outputs", "hidden"], False)))
    return arrays


def malformed_cases(session: Session, sequences: list[np.ndarray]) -> dict[str, dict]:
    ids, lengths = padded(sequences[:2], np.int32)
    t = session.tensor
    cases: dict[str, Callable[[], Any]] = {
        "wrong_input_name": lambda: session.infer([t("tokens", ids, "INT32")]),
        "wrong_datatype": lambda: session.infer([t("ids", ids.astype(np.float32), "FP32")]),
        "wrong_shape": lambda: session.infer([t("ids", ids[0], "INT32")]),
        "out_of_range_id": lambda: session.infer([t("ids", np.array([[5, 96, 7]], np.int32), "INT32")]),
        "lengths_past_steps": lambda: session.infer(
            [t("ids", ids, "INT32"), t("lengths", lengths + ids.shape[1], "INT32")]),
        "unknown_model": lambda: session.infer([t("ids", ids, "INT32")], model="nope"),
        "unknown_output": lambda: session.infer([t("ids", ids, "INT32")], session.wanted(["probs"])),
    }
    errors = {}
    for case, call in cases.items():
        try:
            call()
            errors[case] = {"status": "OK", "message": ""}
        except InferenceServerException as exc:
            errors[case] = {"status": str(exc.status()), "message": str(exc.message())}
    return errors


def main(protocol: str, url: str, model: str, sequences_file: str, out: str) -> None:
    with np.load(sequences_file) as data:
        sequences = np.split(data["ids"], np.cumsum(data["lengths"])[:-1])
    session = Session(protocol, url, model)
    report = {"live": session.client.is_server_live(), "ready": session.client.is_server_ready(),
              "model_ready": session.client.is_model_ready(model), **session.metadata(),
              "errors": malformed_cases(session, sequences)}
    try:
        session.client.is_model_ready("nope")
        report["unknown_model_ready"] = "answered"
    except InferenceServerException as exc:
        report["unknown_model_ready"] = str(exc.status())
    Path(out, "report.json").write_text(json.dumps(report, indent=1, default=str))
    np.savez(Path(out, "tensors.npz"), **inference_cases(session, sequences))
    session.client.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
