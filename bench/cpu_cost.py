"""What a request costs the server in CPU time, not wall time (a shared, loaded machine
changes the second, hardly the first): the service (``ENGINE=onnxruntime``, its access log
written to a file as in production) answers N sequential one-sequence ``/infer`` requests
over one keep-alive connection, and the server process's utime + stime (``/proc/<pid>/stat``,
every thread) before and after give CPU ms per request. For comparison: the engine's own
call through the runner, in this process, by ``time.process_time``; a bare uvicorn answer.

usage: python -m bench.cpu_cost [--requests 2000] [--lengths 16 64 256] [--path /infer]
       [--trees DIR ...] [--rounds N] [--bare] [--profile FILE]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.server import HOST, PORT, ROOT, cpu_seconds, start_server, stop


def request_bytes(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def exchange(conn: socket.socket, message: bytes, pending: bytearray) -> int:
    """Send one request, read its (Content-Length or chunked) answer; returns the status."""
    conn.sendall(message)
    while b"\r\n\r\n" not in pending:
        pending += conn.recv(65536)
    head, _, rest = bytes(pending).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lines = head.lower().split(b"\r\n")
    length = next((int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length:")), None)
    pending[:] = rest
    if length is not None:
        while len(pending) < length:
            pending += conn.recv(65536)
        del pending[:length]
        return status
    while b"0\r\n\r\n" not in pending:  # chunked: read to the last chunk
        pending += conn.recv(65536)
    del pending[:pending.index(b"0\r\n\r\n") + 5]
    return status


def server_cost(pid: int, messages: list[bytes], requests: int, warm: int = 200) -> tuple[float, float]:
    """CPU ms per request of the server ``pid`` over ``requests`` sequential requests: all of
    its threads, and its main thread alone (the event loop's)."""
    with socket.create_connection((HOST, PORT)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pending = bytearray()
        for i in range(warm):
            assert exchange(conn, messages[i % len(messages)], pending) == 200
        time.sleep(0.2)
        before, loop_before = cpu_seconds(pid), cpu_seconds(pid, pid)
        for i in range(requests):
            status = exchange(conn, messages[i % len(messages)], pending)
            assert status == 200, status
        time.sleep(0.2)  # the access log's last lines
        return (1000 * (cpu_seconds(pid) - before - 0.4 * idle_rate(pid)) / requests,
                1000 * (cpu_seconds(pid, pid) - loop_before) / requests)


def idle_rate(pid: int) -> float:
    """CPU seconds per second the idle server spends (timers, the log's thread)."""
    return _idle.setdefault(pid, _measure_idle(pid))


_idle: dict[int, float] = {}


def _measure_idle(pid: int) -> float:
    before = cpu_seconds(pid)
    time.sleep(2)
    return (cpu_seconds(pid) - before) / 2


def profile(pid: int, messages: list[bytes], requests: int, out: str) -> None:
    from bench.breakdown import py_spy

    spy_path = py_spy()
    if spy_path is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    spy = subprocess.Popen([spy_path, "record", "--gil",
                            "-r", "500", "-f", "raw", "-o", out, "--pid", str(pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    server_cost(pid, messages, requests * 2)
    spy.send_signal(2)
    spy.wait()


def bodies(length: int, rng: np.random.Generator) -> list[bytes]:
    return [json.dumps({"sequences": [rng.integers(2, 96, length).tolist()]}).encode() for _ in range(64)]


def engine_cost(lengths: list[int], requests: int) -> dict[int, float]:
    """The engine's call through the service's runner, in this process: CPU ms per call."""
    from app.engine.buckets import length_buckets
    from app.engine.engines import make_engine
    from app.engine.runner import Runner
    from app.formats.bundle import load_bundle

    spec = load_bundle(ROOT / "models" / "segmenter").spec
    buckets = length_buckets(2048)
    runner = Runner(make_engine("onnxruntime", spec, None, buckets), buckets, 32)
    rng = np.random.default_rng(1)
    costs = {}
    for length in lengths:
        sequences = [rng.integers(2, 96, length).astype(np.int32) for _ in range(64)]
        for sequence in sequences[:20]:
            runner.run([sequence])
        before = time.process_time()
        for i in range(requests):
            runner.run([sequences[i % 64]])
        costs[length] = 1000 * (time.process_time() - before) / requests
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--path", default="/infer")
    parser.add_argument("--trees", nargs="+", default=[str(ROOT)], metavar="DIR",
                        help="source trees to serve from, in turn (e.g. a checkout of the code before)")
    parser.add_argument("--rounds", type=int, default=1, help="each tree this many times, interleaved: "
                        "the median is reported")
    parser.add_argument("--bare", action="store_true", help="also a bare uvicorn answer")
    parser.add_argument("--no-engine", action="store_true", help="skip the in-process engine calls")
    parser.add_argument("--profile", metavar="FILE", help="py-spy (GIL holders, raw) of the server during "
                        "the first length's requests, written to FILE")
    args = parser.parse_args()
    samples = {tree: {n: [] for n in args.lengths} for tree in args.trees}
    loop_samples = {tree: {n: [] for n in args.lengths} for tree in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            for length, (ms, loop_ms) in service_cost(tree, args).items():
                samples[tree][length].append(ms)
                loop_samples[tree][length].append(loop_ms)
    results: dict[str, object] = {
        name: {tree: {n: round(statistics.median(ms), 3) for n, ms in by_length.items()}
               for tree, by_length in measured.items()}
        for name, measured in (("service_cpu_ms", samples), ("event_loop_thread_cpu_ms", loop_samples))}
    if args.rounds > 1:
        results["samples"] = samples
    if args.bare:
        from bench.server import start_bare_uvicorn

        bare = start_bare_uvicorn()
        try:
            results["bare_uvicorn_cpu_ms"] = round(
                server_cost(bare.pid, [request_bytes("/infer", b"{}")], args.requests)[0], 4)
        finally:
            stop(bare)
    if not args.no_engine:
        engine = engine_cost(args.lengths, args.requests)
        results["engine_cpu_ms"] = {n: round(ms, 3) for n, ms in engine.items()}
    print(json.dumps(results))


def service_cost(tree: str, args: argparse.Namespace) -> dict[int, tuple[float, float]]:
    """CPU ms per request of the service served from ``tree``, per length (all threads, the
    event loop's)."""
    rng = np.random.default_rng(0)
    costs = {}
    with tempfile.NamedTemporaryFile(prefix="cpu-cost-", suffix=".log") as log_file:
        process, _ = start_server({"ENGINE": "onnxruntime"}, tree=Path(tree), log=log_file)
        try:
            for length in args.lengths:
                messages = [request_bytes(args.path, body) for body in bodies(length, rng)]
                if args.profile and length == args.lengths[0]:
                    profile(process.pid, messages, args.requests, args.profile)
                costs[length] = server_cost(process.pid, messages, args.requests)
        finally:
            stop(process)
    return costs


if __name__ == "__main__":
    main()
