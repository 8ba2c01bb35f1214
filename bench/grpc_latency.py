"""One 64-token request over gRPC (``ModelInfer``, raw tensor contents) and over HTTP
(``/infer``, JSON), from Python clients in this process (grpcio's stub on one channel, an
httpx client keeping its connection), in interleaved rounds against one server: p50 and
p99 of each, and the server's CPU per request (from /proc). Both clients cost the same
machine's CPU, as a user's program on the gateway's side would.

The gRPC request names the ``outputs`` tensor, the one ``/infer`` answers; a second gRPC
client names none and so gets ``hidden`` as well (the protocol's default), timed beside
them. ``python -m bench.grpc_latency``
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import grpc
import httpx
import numpy as np
import orjson

from app.api.kserve import grpc_predict_v2_pb2 as pb
from app.api.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from bench.loadgen import client_collector_quiet
from bench.server import HOST, PORT, cpu_seconds, free_port, start_server, stop

TOKENS = 64


def calls(ids: np.ndarray, grpc_port: int) -> dict[str, Callable[[], object]]:
    http = httpx.Client(base_url=f"http://{HOST}:{PORT}", timeout=10)
    body = orjson.dumps({"sequences": [ids.tolist()]})
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(f"{HOST}:{grpc_port}"))
    tensor = pb.ModelInferRequest.InferInputTensor
    both = pb.ModelInferRequest(
        model_name="segmenter",
        inputs=[tensor(name="ids", datatype="INT32", shape=[1, len(ids)]),
                tensor(name="lengths", datatype="INT32", shape=[1])],
        raw_input_contents=[ids.tobytes(), np.array([len(ids)], np.int32).tobytes()])
    outputs = pb.ModelInferRequest(outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="outputs")])
    outputs.MergeFrom(both)
    headers = {"content-type": "application/json"}
    return {"http": lambda: http.post("/infer", content=body, headers=headers).raise_for_status(),
            "grpc": lambda: stub.ModelInfer(outputs, timeout=10),
            "grpc_both_outputs": lambda: stub.ModelInfer(both, timeout=10)}


def run(quick: bool = False) -> dict:
    grpc_port = free_port()
    process, _ = start_server({"GRPC_PORT": str(grpc_port)})
    try:
        ids = np.random.default_rng(TOKENS).integers(2, 95, TOKENS).astype(np.int32)
        clients = calls(ids, grpc_port)
        times: dict[str, list[float]] = {name: [] for name in clients}
        cpu = dict.fromkeys(clients, 0.0)
        for call in clients.values():  # connections made, first calls done
            for _ in range(20):
                call()
        with client_collector_quiet():
            for _ in range(3 if quick else 10):
                for name, call in clients.items():
                    before = cpu_seconds(process.pid)
                    for _ in range(100):
                        start = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - start)
                    cpu[name] += cpu_seconds(process.pid) - before
        return {name: {"p50_ms": 1000 * statistics.median(t), "p99_ms": 1000 * float(np.percentile(t, 99)),
                       "server_cpu_ms": 1000 * cpu[name] / len(t), "n": len(t)}
                for name, t in times.items()} | {"tokens": TOKENS}
    finally:
        stop(process)


if __name__ == "__main__":
    print(orjson.dumps(run(), option=orjson.OPT_INDENT_2).decode())
