"""The Open Inference Protocol under the same memory admission as ``/infer``: over-budget
requests refused with the protocol's error and advice, answers streamed part by part equal to
``/infer``'s, real tritonclient decoding streamed answers, and the maximal v2 request inside a
real 512 MiB memory cgroup answered or refused, never OOM-killed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import grpc
import httpx
import numpy as np
import orjson
import pytest

from app.api.kserve import grpc_predict_v2_pb2 as pb
from app.api.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, ROOT, Server
from tests.helpers import max_diff
from tests.test_limits import make_cgroup, serve_in_cgroup

MiB = 2**20
MODEL = "segmenter"
INFER = f"/v2/models/{MODEL}/infer"
CLIENT_PYTHON = ROOT / ".venv-client" / "bin" / "python"


@pytest.fixture(scope="module")
def tight():
    server = Server({"MEMORY_BUDGET_BYTES": str(16 * MiB), "REQUEST_TIMEOUT_S": "5", "DRAIN_DELAY_S": "0"},
                    serve=True)
    server.wait_until()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def parts_server():
    """Engine calls of at most 256 padded tokens: every request below runs in many parts."""
    server = Server({"MAX_BATCH_TOKENS": "256", "DRAIN_DELAY_S": "0"}, serve=True)
    server.wait_until()
    yield server
    server.stop()


def binary_request(ids: np.ndarray, outputs: list[tuple[str, bool]],
                   lengths: np.ndarray | None = None) -> tuple[bytes, dict[str, str]]:
    """A v2 request with its inputs as binary data; ``outputs``: (name, as binary data)."""
    inputs = [("ids", ids.astype("<i4"))]
    inputs += [("lengths", lengths.astype("<i4"))] if lengths is not None else []
    header = orjson.dumps({
        "inputs": [{"name": name, "datatype": "INT32", "shape": list(array.shape),
                    "parameters": {"binary_data_size": array.nbytes}} for name, array in inputs],
        "outputs": [{"name": name, "parameters": {"binary_data": binary}} for name, binary in outputs]})
    return header + b"".join(array.tobytes() for _, array in inputs), {
        "Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}


def decoded(response: httpx.Response) -> dict[str, np.ndarray]:
    """Each output tensor of a v2 answer (binary data or JSON), by name."""
    length = int(response.headers.get("inference-header-content-length", len(response.content)))
    header, offset, tensors = json.loads(response.content[:length]), length, {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is None:
            values = np.asarray(output["data"], np.float32)
        else:
            values = np.frombuffer(response.content[offset:offset + size], "<f4")
            offset += size
        tensors[output["name"]] = values.reshape(output["shape"])
    assert offset == len(response.content)
    return tensors


def padded(sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) for s in sequences])
    ids = np.zeros((len(sequences), lengths.max()), np.int32)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = sequence
    return ids, lengths


def grpc_infer(server: Server, ids: np.ndarray, names: list[str]) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(
        model_name=MODEL, raw_input_contents=[ids.astype("<i4").tobytes()],
        inputs=[pb.ModelInferRequest.InferInputTensor(name="ids", datatype="INT32", shape=list(ids.shape))],
        outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name=name) for name in names])
    options = [("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(server.grpc_target, options=options) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=300)


# --- over the budget: the protocol's error, naming the limit and what to do -----------------

def test_over_budget_v2_http_gets_413_naming_the_limit(tight: Server) -> None:
    body, headers = binary_request(np.full((16, 2048), 5, np.int32), [("outputs", True), ("hidden", True)])
    response = httpx.post(tight.url + INFER, content=body, headers=headers, timeout=60)
    assert response.status_code == 413, response.text
    message = response.json()["error"]  # streamed, hidden or not it needs its parts in flight:
    assert "MEMORY_BUDGET_BYTES" in message and "split it" in message and "hidden' out" not in message


def test_a_v2_answer_gathered_whole_is_told_to_leave_hidden_out(tight: Server) -> None:
    ids = np.full((4, 2048), 5, np.int32)  # JSON hidden in the header ahead of binary outputs
    body, headers = binary_request(ids, [("outputs", True), ("hidden", False)])
    response = httpx.post(tight.url + INFER, content=body, headers=headers, timeout=60)
    assert response.status_code == 413, response.text
    assert "leave 'hidden' out of the requested outputs" in response.json()["error"]
    lighter, headers = binary_request(ids, [("outputs", True)])  # what the advice says: it fits
    answer = httpx.post(tight.url + INFER, content=lighter, headers=headers, timeout=60)
    assert answer.status_code == 200 and decoded(answer)["outputs"].shape == (4, 2048, 2)


def test_over_budget_v2_grpc_gets_resource_exhausted_with_advice(tight: Server) -> None:
    ids = np.full((4, 2048), 5, np.int32)  # one message, built whole
    with pytest.raises(grpc.RpcError) as caught:
        grpc_infer(tight, ids, ["outputs", "hidden"])
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "MEMORY_BUDGET_BYTES" in caught.value.details()
    assert "leave 'hidden' out" in caught.value.details()
    response = grpc_infer(tight, ids, ["outputs"])
    assert len(response.raw_output_contents[0]) == 4 * 2048 * 2 * 4
    assert budget_freed(tight), "the message's share of the budget is freed once the call is over"


def budget_freed(server: Server) -> bool:
    for _ in range(50):
        if server.metric("bigru_memory_budget_used_bytes") == 0:
            return True
        time.sleep(0.1)
    return False


def test_a_taken_budget_means_503_with_retry_after_over_v2(tight: Server) -> None:
    body, headers = binary_request(np.full((4, 2048), 7, np.int32), [("outputs", True), ("hidden", True)])

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tight.url, timeout=60) as client:
            return await asyncio.gather(*[client.post(INFER, content=body, headers=headers)
                                          for _ in range(8)])

    responses = asyncio.run(run())
    statuses = {r.status_code for r in responses}
    assert statuses <= {200, 503} and 200 in statuses, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1" and "retry" in response.json()["error"]
    assert len({r.content for r in responses if r.status_code == 200}) == 1
    assert budget_freed(tight)


# --- streamed answers: part by part, equal to /infer's ---------------------------------------

def infer_alone(server: Server, sequences: list[np.ndarray]) -> dict:
    body = {"sequences": [s.tolist() for s in sequences], "return_hidden": True}
    return httpx.post(server.url + "/infer", json=body, timeout=120).json()


@pytest.mark.parametrize("form", ["binary", "json", "mixed", "hidden_only", "outputs_first"])
def test_streamed_v2_answers_equal_infer(parts_server: Server, gpu_reference: dict, form: str) -> None:
    rows = [0, 3, 5, 7, 9, 11]
    sequences = [gpu_reference["ids"][i] for i in rows]
    ids, lengths = padded(sequences)
    outputs = {"binary": [("outputs", True), ("hidden", True)],
               "json": [("outputs", False), ("hidden", False)],
               "mixed": [("outputs", False), ("hidden", True)], "hidden_only": [("hidden", True)],
               "outputs_first": [("hidden", True), ("outputs", True)]}[form]
    body, headers = binary_request(ids, outputs, lengths)
    response = httpx.post(parts_server.url + INFER, content=body, headers=headers, timeout=120)
    assert response.status_code == 200, response.text
    if form == "json":  # its length is known only at the end
        assert response.headers["transfer-encoding"] == "chunked"
    tensors = decoded(response)
    assert set(tensors) == {name for name, _ in outputs}
    if form in ("binary", "json"):  # both stream: hidden first, the small outputs kept for the end
        assert list(tensors) == ["hidden", "outputs"]
    expected = infer_alone(parts_server, sequences)
    for name in tensors:
        got = tensors[name]
        assert got.shape[:2] == (len(rows), ids.shape[1])
        assert max_diff([got[i, :n] for i, n in enumerate(lengths)],
                        [np.asarray(e, np.float32) for e in expected[name]]) <= 1e-6
        assert all(not got[i, n:].any() for i, n in enumerate(lengths)), "padding rows are zero"


def test_grpc_answer_gathered_part_by_part_equals_infer(parts_server: Server, gpu_reference: dict) -> None:
    sequences = [gpu_reference["ids"][i] for i in (2, 4, 6)]
    ids = np.stack([s[: min(map(len, sequences))] for s in sequences]).astype(np.int32)  # no `lengths`
    response = grpc_infer(parts_server, ids, ["outputs", "hidden"])
    expected = infer_alone(parts_server, list(ids))
    for index, name in enumerate(["outputs", "hidden"]):
        shape = list(response.outputs[index].shape)
        got = np.frombuffer(response.raw_output_contents[index], "<f4").reshape(shape)
        assert max_diff(list(got), [np.asarray(e, np.float32) for e in expected[name]]) <= 1e-6


def test_tritonclient_decodes_answers_streamed_in_many_parts(parts_server: Server, gpu_reference: dict,
                                                              tmp_path) -> None:
    if not CLIENT_PYTHON.exists():
        pytest.fail(f"{CLIENT_PYTHON} is missing; `make install` creates it")
    with np.load(DEFAULT_MODEL / "segmenter.ref.npz") as data:
        np.savez(tmp_path / "sequences.npz", ids=data["ids"], lengths=data["lengths"])
    done = subprocess.run([str(CLIENT_PYTHON), str(ROOT / "tests" / "triton_client.py"), "http",
                           f"127.0.0.1:{parts_server.port}", MODEL, str(tmp_path / "sequences.npz"),
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "tensors.npz") as tensors:
        for case in ("batch_int64_binary", "batch_int32_json"):
            for name, reference in (("outputs", "probs_fp32"), ("hidden", "hidden_fp32")):
                got = tensors[f"{case}/{name}"]
                assert max_diff([got[i, : len(gpu_reference["ids"][i])] for i in range(8)],
                                [gpu_reference[reference][i] for i in range(8)]) <= 1e-4


# --- the maximal v2 request in a real 512 MiB memory cgroup ---------------------------------

@pytest.fixture(scope="module")
def in_512_mib():
    cgroup = make_cgroup(512 * MiB)
    # Memory is what these tests measure: a deadline long enough that a loaded machine (the
    # suite's other worker) answers 200 or 503, not 504.
    server = serve_in_cgroup(cgroup, {"DRAIN_DELAY_S": "0", "REQUEST_TIMEOUT_S": "60"})
    try:
        server.wait_until()
        yield server
        assert server.process.poll() is None and httpx.get(server.url + "/readyz").status_code == 200
    finally:
        server.stop()
        assert cgroup.oom_kills() == 0, "the server was OOM-killed"
        cgroup.remove()


MAXIMAL = np.random.default_rng(3).integers(2, 96, (64, 2048)).astype(np.int32)


def test_maximal_v2_http_in_512_mib_alone_and_4_at_once(in_512_mib: Server) -> None:
    body, headers = binary_request(MAXIMAL, [("outputs", True), ("hidden", True)])

    async def post(count: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=in_512_mib.url, timeout=600) as client:
            return await asyncio.gather(*[client.post(INFER, content=body, headers=headers)
                                          for _ in range(count)])

    # (the client holds each answer, 270 MB: the server streams it)
    alone, = asyncio.run(post(1))
    assert alone.status_code == 200
    for response in asyncio.run(post(4)):
        assert response.status_code in (200, 503), response.content[:200]
        if response.status_code == 200:
            assert response.content == alone.content
        else:
            assert "retry" in response.json()["error"] and response.headers["retry-after"] == "1"
    tensors = decoded(alone)
    expected = infer_alone(in_512_mib, [MAXIMAL[0], MAXIMAL[63]])
    for name in ("outputs", "hidden"):
        assert max_diff([tensors[name][0], tensors[name][63]],
                        [np.asarray(e, np.float32) for e in expected[name]]) <= 1e-6


def test_maximal_v2_grpc_in_512_mib_is_answered_or_refused_clearly(in_512_mib: Server) -> None:
    try:
        response = grpc_infer(in_512_mib, MAXIMAL, ["outputs", "hidden"])
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.details()
        assert "MEMORY_BUDGET_BYTES" in exc.details() and "leave 'hidden' out" in exc.details()
        response = grpc_infer(in_512_mib, MAXIMAL, ["outputs"])  # the advice: it fits
    assert len(response.raw_output_contents[-1]) in (64 * 2048 * 2 * 4, 64 * 2048 * 256 * 4)
