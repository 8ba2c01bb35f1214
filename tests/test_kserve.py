"""The Open Inference Protocol (KServe v2) over HTTP and gRPC, with the real tritonclient
(tests/triton_client.py, in .venv-client) against a real server; malformed requests the client
won't send go raw (httpx, and grpcio with the service's own generated stub)."""

from __future__ import annotations

import gzip
import json
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from app.api.kserve import grpc_predict_v2_pb2 as pb
from app.api.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, ROOT, Server
from tests.helpers import max_diff

CLIENT_PYTHON = ROOT / ".venv-client" / "bin" / "python"
GPU_TOLERANCE = 1e-4
PROTOCOLS = ("http", "grpc")
MODEL = "segmenter"
INFER = f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def tritonclient_runs(server: Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """What tritonclient saw, over each protocol: (report, tensors)."""
    if not CLIENT_PYTHON.exists():
        pytest.fail(f"{CLIENT_PYTHON} is missing; `make install` creates it")
    sequences = tmp_path_factory.mktemp("kserve") / "sequences.npz"
    with np.load(DEFAULT_MODEL / "segmenter.ref.npz") as data:
        np.savez(sequences, ids=data["ids"], lengths=data["lengths"])
    runs = {}
    for protocol, address in (("http", f"127.0.0.1:{server.port}"), ("grpc", server.grpc_target)):
        out = tmp_path_factory.mktemp(protocol)
        done = subprocess.run([str(CLIENT_PYTHON), str(ROOT / "tests" / "triton_client.py"), protocol,
                               address, MODEL, str(sequences), str(out)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        with np.load(out / "tensors.npz") as tensors:
            runs[protocol] = (json.loads((out / "report.json").read_text()),
                              {key: tensors[key] for key in tensors.files})
    return runs


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_and_metadata(tritonclient_runs: dict, protocol: str) -> None:
    report, _ = tritonclient_runs[protocol]
    assert report["live"] is True and report["ready"] is True and report["model_ready"] is True
    assert report["server"]["name"] == "bigru-serve"
    assert report["server"]["extensions"] == ["binary_tensor_data"]
    model = report["model"]
    assert model["name"] == MODEL and model["versions"] == ["1"]
    tensors = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]])
               for t in model["inputs"] + model["outputs"]}
    assert tensors == {"ids": ("INT32", [-1, -1]), "lengths": ("INT32", [-1]),
                       "outputs": ("FP32", [-1, -1, 2]), "hidden": ("FP32", [-1, -1, 256])}
    assert report["unknown_model_ready"] in ("answered", "StatusCode.NOT_FOUND")


CASES = {"http": ["single_int32_all_outputs", "batch_int64_binary", "batch_outputs_only", "batch_int32_json"],
         "grpc": ["single_int32_all_outputs", "batch_int64_binary", "batch_outputs_only"]}


@pytest.mark.parametrize(("protocol", "case"), [(p, c) for p in PROTOCOLS for c in CASES[p]])
def test_inference_matches_the_gpu(tritonclient_runs: dict, gpu_reference: dict, protocol: str,
                                   case: str) -> None:
    _, tensors = tritonclient_runs[protocol]
    if case.startswith("single"):
        row = int(np.argmax(gpu_reference["lengths"]))
        rows = [row]
    else:
        rows = list(range(8))
    lengths = [len(gpu_reference["ids"][i]) for i in rows]
    assert str(tensors[f"{case}/id"]) == "req-7"
    expected_names = {"outputs"} if case == "batch_outputs_only" else {"outputs", "hidden"}
    assert {key.split("/")[1] for key in tensors if key.startswith(case + "/")} - {"id"} == expected_names
    for name, reference in (("outputs", "probs_fp32"), ("hidden", "hidden_fp32")):
        if name not in expected_names:
            continue
        got = tensors[f"{case}/{name}"]
        assert got.dtype == np.float32 and got.shape[:2] == (len(rows), max(lengths))
        assert max_diff([got[i, :n] for i, n in enumerate(lengths)],
                        [gpu_reference[reference][r] for r in rows]) <= GPU_TOLERANCE
        assert all(not got[i, n:].any() for i, n in enumerate(lengths)), "padding rows are zero"


def test_padded_batch_rows_equal_infer_one_at_a_time(tritonclient_runs: dict, server: Server,
                                                     gpu_reference: dict) -> None:
    _, tensors = tritonclient_runs["http"]
    batched = tensors["batch_int64_binary/outputs"]
    for row in range(8):
        sequence = gpu_reference["ids"][row]
        alone = httpx.post(server.url + "/infer", json={"sequences": [sequence.tolist()]}).json()
        expected = np.asarray(alone["outputs"][0], np.float32)
        assert max_diff([batched[row, : len(sequence)]], [expected]) <= 1e-6


EXPECTED_ERRORS = {
    "wrong_input_name": (400, "unknown input 'tokens'"),
    "wrong_datatype": (400, "must be INT32 or INT64"),
    "wrong_shape": (400, "of shape [batch, steps]"),
    "out_of_range_id": (400, "ids.0.1: token id 96 is not an integer in [0, 96)"),
    "lengths_past_steps": (400, "lengths.0: length"),
    "unknown_model": (404, "unknown model 'nope'"),
    "unknown_output": (400, "unknown output 'probs'"),
}
GRPC_CODES = {400: "StatusCode.INVALID_ARGUMENT", 404: "StatusCode.NOT_FOUND"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_malformed_requests_from_tritonclient_get_protocol_errors(tritonclient_runs: dict,
                                                                  protocol: str) -> None:
    report, _ = tritonclient_runs[protocol]
    assert set(report["errors"]) == set(EXPECTED_ERRORS)
    for case, (status, message) in EXPECTED_ERRORS.items():
        got = report["errors"][case]
        assert got["status"] == (str(status) if protocol == "http" else GRPC_CODES[status]), case
        assert message in got["message"], (case, got)


def binary_request(header: dict, *blobs: bytes, header_length: int | None = None) -> tuple[bytes, dict]:
    encoded = json.dumps(header).encode()
    length = len(encoded) if header_length is None else header_length
    return encoded + b"".join(blobs), {"Inference-Header-Content-Length": str(length)}


IDS_2x3 = np.array([[41, 74, 71], [8, 15, 0]], np.int32)
BINARY_IDS = {"name": "ids", "datatype": "INT32", "shape": [2, 3], "parameters": {"binary_data_size": 24}}
RAW_CASES = {
    "not JSON": (b"{nope", {}, 400, "not valid JSON"),
    "no inputs": (b'{"inputs": []}', {}, 400, "inputs"),
    "JSON data of the wrong size": (json.dumps({"inputs": [
        {"name": "ids", "datatype": "INT32", "shape": [2, 3], "data": [1, 2, 3]}]}).encode(), {}, 400,
        "3 elements of data, but shape [2, 3] holds 6"),
    "JSON data not integers": (json.dumps({"inputs": [
        {"name": "ids", "datatype": "INT32", "shape": [1, 2], "data": [1.5, 2]}]}).encode(), {}, 400,
        "not INT32"),
    "INT64 id past every vocabulary": (json.dumps({"inputs": [
        {"name": "ids", "datatype": "INT64", "shape": [1, 1], "data": [2**62]}]}).encode(), {}, 400,
        "is not an integer in [0, 96)"),
    "binary size not the shape's": (*binary_request(
        {"inputs": [{**BINARY_IDS, "parameters": {"binary_data_size": 20}}]}, IDS_2x3.tobytes()[:20]),
        400, "20 bytes of data, but shape [2, 3] of INT32 takes 24"),
    "binary size past the body": (*binary_request({"inputs": [BINARY_IDS]}, IDS_2x3.tobytes()[:12]),
                                  400, "runs past the 12 bytes"),
    "binary bytes left over": (*binary_request({"inputs": [BINARY_IDS]}, IDS_2x3.tobytes(), b"\0" * 8),
                               400, "8 bytes of binary data after the header belong to no input"),
    "header length not a number": (*binary_request({"inputs": [BINARY_IDS]}, IDS_2x3.tobytes())[:1],
                                   {"Inference-Header-Content-Length": "ten"}, 400, "is not an integer"),
    "header length past the body": (*binary_request({"inputs": [BINARY_IDS]}, IDS_2x3.tobytes(),
                                                    header_length=10_000), 400, "outside the body"),
    "header length cutting the JSON": (*binary_request({"inputs": [BINARY_IDS]}, IDS_2x3.tobytes(),
                                                       header_length=20), 400, "not valid JSON"),
    "raw binary request": (IDS_2x3.tobytes(), {"Inference-Header-Content-Length": "0"}, 400,
                           "raw binary request"),
    "unknown encoding": (b"{}", {"Content-Encoding": "br"}, 415, "Content-Encoding 'br'"),
    "body past MAX_BODY_BYTES": (b" " * (5 << 20), {}, 413, "the body exceeds 4194304 bytes"),
    "gzip bomb": (gzip.compress(b" " * (5 << 20)), {"Content-Encoding": "gzip"}, 413,
                  "the decompressed body exceeds 4194304 bytes"),
    "classification": (json.dumps({"inputs": [{"name": "ids", "datatype": "INT32", "shape": [1, 1],
                                               "data": [5]}],
                                   "outputs": [{"name": "outputs", "parameters": {"class_count": 2}}]}
                                  ).encode(), {}, 400, "classification extension is not supported"),
}


@pytest.mark.parametrize("case", RAW_CASES)
def test_malformed_http_requests_get_protocol_errors(server: Server, case: str) -> None:
    body, headers, status, message = RAW_CASES[case]
    response = httpx.post(server.url + INFER, content=body, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and message in error, error


@pytest.mark.parametrize(("path", "status"), [
    ("/v2/models/nope", 404), ("/v2/models/segmenter/versions/2", 404),
    ("/v2/models/segmenter/versions/1", 200), ("/v2/models/segmenter/versions/1/ready", 200),
    ("/v2/models/nope/ready", 404), ("/v2/health/live", 200), ("/v2/health/ready", 200)])
def test_routes_and_versions(server: Server, path: str, status: int) -> None:
    response = httpx.get(server.url + path)
    assert response.status_code == status
    if status == 404:
        assert "error" in response.json()


def test_binary_and_json_tensors_and_versions_over_raw_http(server: Server, gpu_reference: dict) -> None:
    sequence = gpu_reference["ids"][3].astype(np.int32)
    body, headers = binary_request({"id": "raw-1", "inputs": [
        {"name": "ids", "datatype": "INT32", "shape": [1, len(sequence)],
         "parameters": {"binary_data_size": sequence.nbytes}}],
        "outputs": [{"name": "hidden", "parameters": {"binary_data": True}}, {"name": "outputs"}]},
        sequence.tobytes())
    response = httpx.post(server.url + f"/v2/models/{MODEL}/versions/1/infer", content=body,
                          headers={**headers, "X-Request-ID": "kserve-7"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "kserve-7"
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    assert header["id"] == "raw-1" and header["model_name"] == MODEL and header["model_version"] == "1"
    hidden, outputs = header["outputs"]
    assert hidden["parameters"]["binary_data_size"] == len(response.content) - length
    got_hidden = np.frombuffer(response.content[length:], "<f4").reshape(hidden["shape"])[0]
    got_outputs = np.asarray(outputs["data"], np.float32).reshape(outputs["shape"])[0]
    assert max_diff([got_hidden], [gpu_reference["hidden_fp32"][3]]) <= GPU_TOLERANCE
    assert max_diff([got_outputs], [gpu_reference["probs_fp32"][3]]) <= GPU_TOLERANCE


def test_gzip_request_bodies(server: Server) -> None:
    body = json.dumps({"inputs": [{"name": "ids", "datatype": "INT32", "shape": [1, 3],
                                   "data": [[41, 74, 71]]}], "outputs": [{"name": "outputs"}]})
    plain = httpx.post(server.url + INFER, content=body).json()
    packed = httpx.post(server.url + INFER, content=gzip.compress(body.encode()),
                        headers={"Content-Encoding": "gzip"}).json()
    assert plain == packed and packed["outputs"][0]["shape"] == [1, 3, 2]


def grpc_stub(server: Server) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_target))


def ids_tensor(shape: list[int], datatype: str = "INT32",
               **contents: list) -> pb.ModelInferRequest.InferInputTensor:
    tensor = pb.ModelInferRequest.InferInputTensor(name="ids", datatype=datatype, shape=shape)
    if contents:
        tensor.contents.CopyFrom(pb.InferTensorContents(**contents))
    return tensor


def test_grpc_typed_contents_and_request_ids(server: Server, gpu_reference: dict) -> None:
    sequence = gpu_reference["ids"][5]
    request = pb.ModelInferRequest(model_name=MODEL, id="typed-1", outputs=[
        pb.ModelInferRequest.InferRequestedOutputTensor(name="outputs")],
        inputs=[ids_tensor([1, len(sequence)], int_contents=sequence.tolist())])
    response, call = grpc_stub(server).ModelInfer.with_call(request, metadata=(("x-request-id", "grpc-9"),))
    assert ("x-request-id", "grpc-9") in call.initial_metadata()
    assert response.id == "typed-1" and [o.name for o in response.outputs] == ["outputs"]
    got = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))[0]
    assert max_diff([got], [gpu_reference["probs_fp32"][5]]) <= GPU_TOLERANCE


GRPC_CASES = {
    "raw size not the shape's": (pb.ModelInferRequest(
        model_name=MODEL, inputs=[ids_tensor([1, 3])], raw_input_contents=[struct.pack("<2i", 5, 6)]),
        grpc.StatusCode.INVALID_ARGUMENT, "8 bytes of data, but shape [1, 3] of INT32 takes 12"),
    "raw contents for fewer inputs": (pb.ModelInferRequest(
        model_name=MODEL, inputs=[ids_tensor([1, 1])], raw_input_contents=[b"\0" * 4, b"\0" * 4]),
        grpc.StatusCode.INVALID_ARGUMENT, "2 raw_input_contents for 1 inputs"),
    "typed contents of the wrong size": (pb.ModelInferRequest(
        model_name=MODEL, inputs=[ids_tensor([1, 3], int_contents=[1, 2])]),
        grpc.StatusCode.INVALID_ARGUMENT, "2 elements of data"),
    "negative shape": (pb.ModelInferRequest(
        model_name=MODEL, inputs=[ids_tensor([1, -3])], raw_input_contents=[b""]),
        grpc.StatusCode.INVALID_ARGUMENT, "negative dimension"),
    "unknown version": (pb.ModelInferRequest(
        model_name=MODEL, model_version="7", inputs=[ids_tensor([1, 1], int_contents=[5])]),
        grpc.StatusCode.NOT_FOUND, "has no version '7'"),
    "past MAX_BODY_BYTES": (pb.ModelInferRequest(
        model_name=MODEL, inputs=[ids_tensor([1, 1])], raw_input_contents=[b"\0" * (5 << 20)]),
        grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
}


@pytest.mark.parametrize("case", GRPC_CASES)
def test_malformed_grpc_requests_get_status_codes(server: Server, case: str) -> None:
    request, code, message = GRPC_CASES[case]
    with pytest.raises(grpc.RpcError) as caught:
        grpc_stub(server).ModelInfer(request)
    assert caught.value.code() == code and message in caught.value.details()
    assert grpc_stub(server).ServerReady(pb.ServerReadyRequest()).ready


def test_metrics_count_both_protocols(server: Server, tritonclient_runs: dict) -> None:
    text = httpx.get(server.url + "/metrics").text
    assert 'bigru_http_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"}' in text
    assert 'bigru_http_requests_total{method="POST",route="/v2/models/{name}/infer",status="400"}' in text
    assert 'bigru_grpc_requests_total{code="OK",method="ModelInfer"}' in text
    assert 'bigru_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"}' in text
    assert "bigru_grpc_request_duration_seconds_bucket" in text


def test_not_ready_is_said_over_both_protocols() -> None:
    server = Server({"PARITY_TOLERANCE": "1e-12"})  # the self-check fails: up, never ready
    try:
        server.wait_until("/healthz")
        server.wait_until("/readyz", status=503)
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        assert httpx.get(server.url + "/v2/health/ready").status_code == 400
        assert httpx.get(server.url + f"/v2/models/{MODEL}/ready").status_code == 400
        body = {"inputs": [{"name": "ids", "datatype": "INT32", "shape": [1, 1], "data": [5]}]}
        refused = httpx.post(server.url + INFER, json=body)
        assert refused.status_code == 503 and "not ready (failed: version 1: " in refused.json()["error"]
        assert refused.headers["retry-after"] == "1"
        stub = grpc_stub(server)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert not stub.ServerReady(pb.ServerReadyRequest()).ready
        assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL,
                                                 inputs=[ids_tensor([1, 1], int_contents=[5])]))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_grpc_off_switch() -> None:
    server = Server({"GRPC_PORT": "0"})
    try:
        server.wait_until()
        channel = grpc.insecure_channel(server.grpc_target)
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(channel).result(timeout=1)
        assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    finally:
        server.stop()


def test_sigterm_lets_a_grpc_call_in_flight_finish() -> None:
    # Time limits far past the call's few seconds, so that only the shutdown could cut it short.
    server = Server({"DRAIN_DELAY_S": "0.5", "WORKERS": "1", "REQUEST_TIMEOUT_S": "120",
                     "GRACE_PERIOD_S": "120"}, serve=True)
    server.wait_until()
    ids = np.random.default_rng(0).integers(0, 96, size=(64, 2048), dtype=np.int32)
    request = pb.ModelInferRequest(model_name=MODEL, inputs=[ids_tensor(list(ids.shape))],
                                   outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="outputs")],
                                   raw_input_contents=[ids.tobytes()])
    result: dict = {}

    def call() -> None:
        try:
            result["response"] = grpc_stub(server).ModelInfer(request, timeout=150)
        except grpc.RpcError as exc:
            result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 60
    # until the server holds the call (its memory admitted), not just the client
    while server.metric("bigru_memory_budget_used_bytes") == 0:
        assert caller.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.05)
    assert caller.is_alive(), "the call is in flight (64 x 2048 tokens take seconds on 2 cores)"
    server.process.send_signal(signal.SIGTERM)
    caller.join(timeout=150)
    assert server.process.wait(timeout=150) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    assert "error" not in result, result.get("error")
    assert "gRPC" in server.output() and "stopped" in server.output()
    assert list(result["response"].outputs[0].shape) == [64, 2048, 2]


def test_generated_grpc_code_is_current(tmp_path: Path) -> None:
    """The committed *_pb2*.py are what `make proto` makes from the committed .proto. (protoc runs
    in a process of its own: in one that has loaded TensorFlow's protobuf it can crash.)"""
    proto = "app/api/kserve/grpc_predict_v2.proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", proto],
                   cwd=ROOT, check=True, timeout=120)
    for generated in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"):
        path = Path("app/api/kserve") / generated
        assert (tmp_path / path).read_text() == (ROOT / path).read_text(), generated


def test_overload_and_deadline_answer_in_the_protocol_form() -> None:
    server = Server({"MAX_QUEUE": "1", "REQUEST_TIMEOUT_S": "0.001"})
    try:
        server.wait_until()

        def body(rows: int) -> dict:
            return {"inputs": [{"name": "ids", "datatype": "INT32", "shape": [rows, 512],
                                "data": [7] * (rows * 512)}]}

        overloaded = httpx.post(server.url + INFER, json=body(2))  # 2 sequences > MAX_QUEUE
        assert overloaded.status_code == 503 and overloaded.headers["retry-after"] == "1"
        assert overloaded.json() == {"error": "the queue is full; retry shortly"}
        late = httpx.post(server.url + INFER, json=body(1))
        assert late.status_code == 504 and late.json() == {"error": "no result within 0.001 s"}
        request = pb.ModelInferRequest(model_name=MODEL, inputs=[ids_tensor([2, 1], int_contents=[5, 6])])
        with pytest.raises(grpc.RpcError) as caught:
            grpc_stub(server).ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        request = pb.ModelInferRequest(model_name=MODEL,
                                       inputs=[ids_tensor([1, 512], int_contents=[7] * 512)])
        with pytest.raises(grpc.RpcError) as caught:
            grpc_stub(server).ModelInfer(request)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        metrics = httpx.get(server.url + "/metrics").text
        assert 'bigru_rejected_requests_total{reason="queue_full"} 2.0' in metrics
    finally:
        server.stop()


def test_a_stopping_grpc_server_refuses_new_calls_and_waits_for_those_in_flight() -> None:
    """grpcio's own stop closes a connection as soon as its last call ends, which can cut that
    call's answer on its way: the service first refuses new calls (UNAVAILABLE, retriable
    elsewhere), waits for the calls in flight, lets their answers leave, then stops grpcio."""
    import asyncio

    from grpc import aio

    from app.api.kserve.admin import AdminGate
    from app.api.kserve.grpc_service import ANSWER_LINGER_S, GrpcServer, start_grpc_server
    from app.config import Settings
    from app.observability import Metrics
    from app.service.repository import Repository
    from tests.conftest import free_port

    async def started() -> tuple[int, GrpcServer]:
        port = free_port()
        settings = Settings(host="127.0.0.1", grpc_port=port)
        return port, await start_grpc_server(Repository(settings, Metrics()), settings, AdminGate(None))

    async def run() -> None:
        _, idle = await started()
        begun = time.monotonic()
        await idle.stop(30)
        assert time.monotonic() - begun < ANSWER_LINGER_S / 2  # no call ended lately: no linger
        port, server = await started()
        server.servicer.calls.enter()  # one call in flight
        stopping = asyncio.ensure_future(server.stop(30))
        await asyncio.sleep(0.05)
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(aio.AioRpcError) as refused:
                await pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest())
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (refused.value.details() or "")
        await asyncio.sleep(0.2)
        assert not stopping.done()  # the call in flight holds it
        left = time.monotonic()
        server.servicer.calls.leave()
        await asyncio.wait_for(server.stop(30), 10)  # a second stop waits for the same one
        assert time.monotonic() - left >= ANSWER_LINGER_S * 0.9  # its answer had time to leave
        assert stopping.done()

    asyncio.run(run())


def test_model_infer_gives_its_answer_serialized_so_grpcio_does_not_serialize_on_the_loop() -> None:
    """grpcio serializes a handler's answer on the event loop, however large: ModelInfer's
    answer is serialized where it is built (off the loop when large: ``dataplane.copied``),
    byte for byte as protobuf would (lengths of one to three varint bytes), and ModelInfer is
    registered without a serializer."""
    from app.api.kserve.answers import AnswerPlan
    from app.api.kserve.grpc_service import add_servicer, infer_response
    from app.api.kserve.tensors import Tensor

    rng = np.random.default_rng(5)
    for steps in (3, 40, 300):
        outputs, hidden = rng.random((2, steps, 2), np.float32), rng.random((2, steps, 40), np.float32)
        plan = AnswerPlan(["outputs", "hidden"], [True, True], 2, steps, {"outputs": 2, "hidden": 40})
        raw = infer_response("segmenter", "1", "call-7", plan,
                             [Tensor("outputs", "FP32", outputs), Tensor("hidden", "FP32", hidden)])
        output = pb.ModelInferResponse.InferOutputTensor
        assert raw == pb.ModelInferResponse(
            model_name="segmenter", model_version="1", id="call-7",
            outputs=[output(name="outputs", datatype="FP32", shape=[2, steps, 2]),
                     output(name="hidden", datatype="FP32", shape=[2, steps, 40])],
            raw_output_contents=[outputs.astype("<f4").tobytes(), hidden.astype("<f4").tobytes()],
        ).SerializeToString()

    class Registry:
        def add_generic_rpc_handlers(self, generic: object) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
            self.handlers = handlers

    class Methods:
        def __getattr__(self, name: str) -> None:
            return None

    registry = Registry()
    add_servicer(Methods(), registry)  # type: ignore[arg-type]
    assert registry.handlers["ModelInfer"].response_serializer is None
    assert registry.handlers["ServerLive"].response_serializer is not None
