"""What a large answer costs on the wire: 64 sequences x 2048 tokens with hidden states
(outputs 64x2048x2 and hidden 64x2048x256 floats), in one run, as

- ``/infer`` JSON (``return_hidden``),
- the Open Inference Protocol over HTTP, JSON tensors and binary tensors,
- the Open Inference Protocol over gRPC (raw contents),

and, as the floor, the v2 binary answer without ``hidden`` (the engine's time and little else).
Per format: response bytes, the median time from request to the last byte and the client's
time to decode the answer into float32 arrays (one server, the formats in turn, REPEATS rounds),
on a fresh server per format, its RSS when ready and its peak (VmHWM) over one answer: what a
replica's memory limit must hold; and, in-process, the server's own time to encode the answer.
Writes ``bench/results/wire_cost.json``. ``python -m bench.wire_cost``
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import numpy as np
import orjson

from bench.server import HOST, PORT, RESULTS, free_port, start_server

GRPC_PORT = free_port()

BATCH, STEPS, REPEATS = 64, 2048, 3
URL = f"http://{HOST}:{PORT}"


def infer_json(ids: np.ndarray) -> Callable[[], tuple[int, Callable[[], object]]]:
    body = orjson.dumps({"sequences": ids.tolist(), "return_hidden": True})

    def call() -> tuple[int, Callable[[], object]]:
        response = httpx.post(URL + "/infer", content=body, timeout=300)
        response.raise_for_status()
        return len(response.content), lambda: [np.asarray(rows, np.float32)
                                                 for key in ("outputs", "hidden")
                                                 for rows in orjson.loads(response.content)[key]]
    return call


Call = Callable[[], tuple[int, Callable[[], object]]]  # -> (response bytes, decode)


def v2_http(ids: np.ndarray, binary: bool, names: tuple[str, ...]) -> Call:
    outputs = [{"name": name, "parameters": {"binary_data": binary}} for name in names]
    header = orjson.dumps({"inputs": [{"name": "ids", "datatype": "INT32", "shape": list(ids.shape),
                                       "parameters": {"binary_data_size": ids.nbytes}}], "outputs": outputs})
    body, headers = header + ids.tobytes(), {"Inference-Header-Content-Length": str(len(header))}

    def call() -> tuple[int, Callable[[], object]]:
        response = httpx.post(URL + "/v2/models/segmenter/infer", content=body, headers=headers, timeout=300)
        response.raise_for_status()

        def decode() -> object:
            length = int(response.headers.get("inference-header-content-length", len(response.content)))
            answer, offset, arrays = orjson.loads(response.content[:length]), length, []
            for output in answer["outputs"]:
                if binary:
                    size = output["parameters"]["binary_data_size"]
                    arrays.append(np.frombuffer(response.content, "<f4", size // 4, offset))
                    offset += size
                else:
                    arrays.append(np.asarray(output["data"], np.float32))
            return arrays
        return len(response.content), decode
    return call


def v2_grpc(ids: np.ndarray) -> Callable[[], tuple[int, Callable[[], object]]]:
    from app.api.kserve import grpc_predict_v2_pb2 as pb
    from app.api.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

    options = [("grpc.max_receive_message_length", -1)]
    tensor = pb.ModelInferRequest.InferInputTensor(name="ids", datatype="INT32", shape=list(ids.shape))
    request = pb.ModelInferRequest(model_name="segmenter", inputs=[tensor],
                                   raw_input_contents=[ids.tobytes()])

    def call() -> tuple[int, Callable[[], object]]:
        with grpc.insecure_channel(f"{HOST}:{GRPC_PORT}", options=options) as channel:
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=300)
        return response.ByteSize(), lambda: [np.frombuffer(raw, "<f4")
                                             for raw in response.raw_output_contents]
    return call


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timings(calls: dict[str, Call]) -> dict[str, dict]:
    """On one server, REPEATS rounds of every format in turn (so that load drifts hit all alike)."""
    process, _ = start_server({"GRPC_PORT": str(GRPC_PORT)})
    samples: dict[str, list[tuple[int, float, float]]] = {name: [] for name in calls}
    try:
        for _ in range(REPEATS):
            for name, call in calls.items():
                started = time.perf_counter()
                size, decode = call()
                elapsed = time.perf_counter() - started
                started = time.perf_counter()
                decode()
                samples[name].append((size, elapsed, time.perf_counter() - started))
    finally:
        process.terminate()
        process.wait(timeout=60)
    return {name: {"bytes": runs[-1][0], "seconds": statistics.median(r[1] for r in runs),
                   "decode_seconds": statistics.median(r[2] for r in runs)} for name, runs in samples.items()}


def peak_rss(call: Call) -> dict:
    """On a fresh server, one answer: its RSS when ready and its peak, this format's alone."""
    process, _ = start_server({"GRPC_PORT": str(GRPC_PORT)})
    try:
        idle = peak_rss_mib(process.pid)
        call()
        return {"server_idle_rss_mib": idle, "server_peak_rss_mib": peak_rss_mib(process.pid)}
    finally:
        process.terminate()
        process.wait(timeout=60)


def encoders() -> dict[str, Callable[[], object]]:
    """The server's own encoding of one such answer, in-process (engine results made up, in
    parts of 4 sequences as the engine gives them): what each format costs the server's CPU,
    apart from the engine and the network."""
    import asyncio

    from app.api.kserve.answers import AnswerPlan, binary_data, json_document
    from app.api.kserve.grpc_service import infer_response
    from app.api.kserve.signature import gathered_tensors
    from app.api.streaming import infer_document

    rng = np.random.default_rng(1)
    results = [(rng.random((STEPS, 2), np.float32), rng.random((STEPS, 256), np.float32))
               for _ in range(BATCH)]
    widths = {"outputs": 2, "hidden": 256}

    async def parts():
        for start in range(0, BATCH, 4):
            yield results[start:start + 4]

    def drained(chunks) -> int:
        async def drain() -> int:
            return sum([len(chunk) async for chunk in chunks])
        return asyncio.run(drain())

    def v2_grpc() -> object:
        plan = AnswerPlan(["outputs", "hidden"], [True, True], BATCH, STEPS, widths)
        tensors = asyncio.run(gathered_tensors(parts(), BATCH, STEPS, widths, plan.names))
        return infer_response("segmenter", "1", "", plan, tensors)

    def plan(binary: bool) -> AnswerPlan:
        return AnswerPlan.over_http(["outputs", "hidden"], [binary] * 2, BATCH, STEPS, widths)

    header = {"model_name": "segmenter", "model_version": "1"}
    return {
        "v2 HTTP binary": lambda: drained(binary_data(plan(True), b"{}", parts())),
        "v2 gRPC raw": v2_grpc,
        "v2 HTTP JSON": lambda: drained(json_document(plan(False), header, parts())),
        "/infer JSON": lambda: drained(infer_document("segmenter", parts(), True)),
    }


def encode_seconds(encode: Callable[[], object]) -> float:
    samples = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        encode()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> int:
    os.environ.setdefault("REQUEST_TIMEOUT_S", "300")  # this is about bytes, not deadlines
    os.environ.setdefault("MAX_BODY_BYTES", str(16 << 20))
    ids = np.random.default_rng(0).integers(2, 96, (BATCH, STEPS), dtype=np.int32)
    formats = {
        "v2 binary, outputs only (floor)": v2_http(ids, True, ("outputs",)),
        "v2 HTTP binary": v2_http(ids, True, ("outputs", "hidden")),
        "v2 gRPC raw": v2_grpc(ids),
        "v2 HTTP JSON": v2_http(ids, False, ("outputs", "hidden")),
        "/infer JSON": infer_json(ids),
    }
    report = timings(formats)
    for name, call in formats.items():
        report[name].update(peak_rss(call))
    for name, encode in encoders().items():
        report[name]["server_encode_seconds"] = encode_seconds(encode)
    floats = BATCH * STEPS * (2 + 256)
    print(f"{BATCH} x {STEPS} tokens with hidden ({floats:,} floats), median of {REPEATS}:")
    print(f"{'format':34} {'MB':>8} {'B/float':>8} {'s':>7} {'encode s':>9} {'decode s':>9} "
          f"{'RSS idle/peak MiB':>18}")
    for name, row in report.items():
        encode = row.get("server_encode_seconds")
        print(f"{name:34} {row['bytes'] / 1e6:8.1f} {row['bytes'] / floats:8.2f} {row['seconds']:7.2f} "
              f"{'-' if encode is None else f'{encode:.2f}':>9} {row['decode_seconds']:9.2f} "
              f"{row['server_idle_rss_mib']:8.0f} / {row['server_peak_rss_mib']:.0f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "wire_cost.json").write_text(json.dumps({"batch": BATCH, "steps": STEPS, "repeats": REPEATS,
                                                        "formats": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
