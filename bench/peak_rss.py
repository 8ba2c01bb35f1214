"""Peak memory of the maximal request: 64 sequences x 2048 tokens with ``return_hidden``.

Starts ``python -m app serve`` on a free loopback port (optionally inside a memory cgroup of
``--memory-limit`` bytes, like ``docker run --memory``: needs a writable cgroup, i.e. root),
then sends the maximal request alone and ``--concurrent`` of them at once, sampling the
server's RSS every 10 ms. Every answer must be a complete 200 whose bytes equal the lone
answer's (the same request gives the same document), and the process must survive.
Prints and writes ``bench/results/peak_rss.json`` (``peak_rss_<limit>mib.json`` with a limit).

    python -m bench.peak_rss                          # no limit: what one replica needs
    python -m bench.peak_rss --memory-limit 512m      # our deployment files' limit
    python -m bench.peak_rss --protocol v2            # the same over the v2 binary form (or grpc)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

from bench.server import RESULTS, ROOT, rss_bytes

MiB = 2**20
SUCCESS = {0, 200}  # gRPC OK, HTTP 200
# over budget, or the budget taken: HTTP's, and gRPC's RESOURCE_EXHAUSTED and UNAVAILABLE
CLEAR_ERRORS = {413, 503, 8, 14}


def parse_size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30}
    suffix = text[-1].lower()
    return int(float(text[:-1]) * units[suffix]) if suffix in units else int(text)


class MemoryCgroup:
    """A cgroup (v2 or v1) with a memory limit, made under this process's own, for one child."""

    def __init__(self, limit: int) -> None:
        v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
        own = next(line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if (line.startswith("0::") if v2 else ":memory:" in line))
        base = Path("/sys/fs/cgroup") if v2 else Path("/sys/fs/cgroup/memory")
        self.path = base / own.lstrip("/") / f"bigru-peak-rss-{os.getpid()}"
        self.path.mkdir()
        (self.path / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(limit))
        if v2:
            (self.path / "memory.swap.max").write_text("0")
        self.events = self.path / ("memory.events" if v2 else "memory.oom_control")

    def wrap(self, command: list[str]) -> list[str]:
        """Enter the cgroup, then exec the command (so the whole server is limited)."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *command]

    def oom_kills(self) -> int:
        for line in self.events.read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def current(self) -> int:
        """The cgroup's memory use now (RSS and page cache)."""
        name = "memory.current" if (self.path / "memory.current").exists() else "memory.usage_in_bytes"
        return int((self.path / name).read_text())

    def peak(self) -> int:
        """The cgroup's largest memory use (RSS and page cache)."""
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            if (self.path / name).exists():
                return int((self.path / name).read_text())
        return 0

    def remove(self) -> None:
        self.path.rmdir()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(env: dict[str, str], cgroup: MemoryCgroup | None,
                 log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "app", "serve"]
    log = open(log_path, "w")  # noqa: SIM115 (the server writes it while it runs)
    process = subprocess.Popen(cgroup.wrap(command) if cgroup else command, cwd=ROOT,
                               env={**os.environ, "HOST": "127.0.0.1", "PORT": str(port), **env},
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("the service never became ready")


class Sampler:
    """The server's largest RSS while a scenario runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_bytes(self.pid))
            except OSError:
                return
            time.sleep(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def post_all(url: str, body: bytes, count: int, path: str = "/infer",
                   headers: dict[str, str] | None = None) -> list[tuple[int, str, int]]:
    """``count`` requests at once: (status, sha256 of the body, bytes) each."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        async def one() -> tuple[int, str, int]:
            digest, size = hashlib.sha256(), 0
            try:
                async with client.stream("POST", path, content=body, headers=headers or {
                        "content-type": "application/json"}) as response:
                    async for chunk in response.aiter_bytes():
                        digest.update(chunk)
                        size += len(chunk)
            except httpx.HTTPError as exc:
                return -1, type(exc).__name__, size  # the server died or cut the answer
            return response.status_code, digest.hexdigest(), size

        return await asyncio.gather(*[one() for _ in range(count)])


def v2_binary_request(ids: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The Open Inference Protocol's binary form: ``ids`` in, both outputs out as binary data."""
    header = orjson.dumps({"inputs": [{"name": "ids", "datatype": "INT32", "shape": list(ids.shape),
                                       "parameters": {"binary_data_size": ids.nbytes}}],
                           "outputs": [{"name": name, "parameters": {"binary_data": True}}
                                       for name in ("outputs", "hidden")]})
    return header + ids.astype("<i4").tobytes(), {
        "content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}


def grpc_all(target: str, ids: np.ndarray, count: int) -> list[tuple[int, str, int]]:
    """``count`` gRPC ModelInfer calls at once: (status code value, sha256 of the outputs or the
    error's message, bytes) each; 0 is OK."""
    import grpc

    from app.api.kserve import grpc_predict_v2_pb2 as pb
    from app.api.kserve import grpc_predict_v2_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name="segmenter", raw_input_contents=[ids.astype("<i4").tobytes()],
                                   inputs=[pb.ModelInferRequest.InferInputTensor(
                                       name="ids", datatype="INT32", shape=list(ids.shape))])

    def one() -> tuple[int, str, int]:
        with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
            try:
                response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=600)
            except grpc.RpcError as exc:
                return exc.code().value[0], f"{exc.code().name}: {exc.details()}", 0
        contents = b"".join(response.raw_output_contents)
        return 0, hashlib.sha256(contents).hexdigest(), len(contents)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: one(), range(count)))


def mapped_libraries(pid: int) -> list[str]:
    """Which of the big native libraries the server has mapped (TensorFlow costs ~100+ MiB)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [name for name in ("onnxruntime", "tensorflow", "libtensorflow_framework") if name in maps]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-limit", type=parse_size, help="run the server in a memory cgroup")
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--protocol", choices=("infer", "v2", "grpc"), default="infer",
                        help="POST /infer (JSON), the v2 binary form over HTTP, or v2 over gRPC")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    sequences = rng.integers(2, 96, (args.batch, args.length)).tolist()
    body = orjson.dumps({"sequences": sequences, "return_hidden": True})
    ids = np.asarray(sequences, dtype=np.int32)
    grpc_port = free_port()
    if args.protocol == "v2":
        body, headers = v2_binary_request(ids)
    cgroup = MemoryCgroup(args.memory_limit) if args.memory_limit else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"peak_rss_{args.memory_limit // MiB}mib" if args.memory_limit else "peak_rss"
    name += "" if args.protocol == "infer" else f"_{args.protocol}"
    process, url = start_server({"GRPC_PORT": str(grpc_port)}, cgroup, RESULTS / f"{name}.log")
    report: dict = {"request": f"{args.batch} x {args.length} tokens, return_hidden",
                    "protocol": args.protocol,
                    "body_bytes": len(body), "memory_limit": args.memory_limit}
    try:
        report["rss_ready_mib"] = rss_bytes(process.pid) / MiB
        report["mapped"] = mapped_libraries(process.pid)
        report["limits"] = httpx.get(url + "/v1/model").json().get("limits")
        for scenario, count in (("alone", 1), (f"{args.concurrent}_at_once", args.concurrent)):
            started = time.perf_counter()
            with Sampler(process.pid) as sampler:
                if args.protocol == "grpc":
                    answers = grpc_all(f"127.0.0.1:{grpc_port}", ids, count)
                elif args.protocol == "v2":
                    answers = asyncio.run(post_all(url, body, count, "/v2/models/segmenter/infer", headers))
                else:
                    answers = asyncio.run(post_all(url, body, count))
            report[scenario] = {"statuses": [status for status, _, _ in answers],
                            "response_bytes": answers[0][2], "seconds": time.perf_counter() - started,
                            "peak_rss_mib": sampler.peak / MiB}
            answered = [digest for status, digest, _ in answers if status in SUCCESS]
            if answered:
                report.setdefault("digest", answered[0])
            report[scenario]["identical"] = all(digest == report["digest"] for digest in answered)
            errors = {digest for status, digest, _ in answers if status not in SUCCESS}
            report[scenario]["errors"] = sorted(errors)
        report["alive"] = process.poll() is None and httpx.get(url + "/readyz").status_code == 200
        if report["alive"]:
            report["rss_after_mib"] = rss_bytes(process.pid) / MiB
    finally:
        process.terminate()
        process.wait(timeout=30)
        if cgroup:
            report["oom_kills"] = cgroup.oom_kills()
            report["cgroup_peak_mib"] = cgroup.peak() / MiB
            cgroup.remove()
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    answered = [report[k]["statuses"] for k in ("alone", f"{args.concurrent}_at_once")]
    ok = (report["alive"] and not report.get("oom_kills")
          and all(set(s) <= SUCCESS | CLEAR_ERRORS for s in answered)
          and report["alone"]["identical"] and report[f"{args.concurrent}_at_once"]["identical"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
