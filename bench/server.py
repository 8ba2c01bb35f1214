"""Processes the benchmark talks to over loopback: the service as users run it, a bare
uvicorn answer (the floor of any Python HTTP service), and wrk, the C load generator."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"


def free_port() -> int:
    """A port nothing listens on now (other services on this machine must not answer us)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


PORT = int(os.environ.get("BENCH_PORT") or free_port())
BODIES_SCRIPT = Path(__file__).resolve().parent / "bodies.lua"


def start_server(env: dict[str, str] | None = None, argv: tuple[str, ...] = ("-m", "app", "serve"),
                 tree: Path = ROOT, log: IO[bytes] | None = None) -> tuple[subprocess.Popen, float]:
    """Start the service (``python -m app serve`` of source tree ``tree``, request logging
    included, the log written to ``log`` or discarded) and wait for ``/readyz``; returns the
    process and the seconds to ready."""
    process = subprocess.Popen(
        [sys.executable, *argv], cwd=tree,
        env={**os.environ, "HOST": HOST, "PORT": str(PORT), "GRPC_PORT": "0", "PYTHONPATH": str(tree),
             **(env or {})},
        stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL,
    )
    start = time.perf_counter()
    while time.perf_counter() - start < 120:
        try:
            if httpx.get(f"http://{HOST}:{PORT}/readyz", timeout=2).status_code == 200:
                return process, time.perf_counter() - start
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the server never became ready")


def start_bare_uvicorn() -> subprocess.Popen:
    """uvicorn with the service's event loop and HTTP parser, answering every POST with a
    fixed small JSON body: what any request costs before our code runs."""
    process, _ = start_server(argv=("-m", "uvicorn", "bench.bare_app:app", "--host", HOST,
                                    "--port", str(PORT), "--log-level", "warning"))
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A memory line of ``/proc/<pid>/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def stat_fields(pid: int, thread: int | None = None) -> list[str]:
    """``/proc/<pid>/stat`` (or that ``thread``'s) after the command's name: state first."""
    stat = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    return Path(stat).read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, thread: int | None = None, fields: list[str] | None = None) -> float:
    """User + system CPU time of a process, all its threads (``/proc/<pid>/stat``), or of
    that ``thread`` alone (``fields``: its :func:`stat_fields`, already read)."""
    fields = fields or stat_fields(pid, thread)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(connections: int, seconds: int, lengths: tuple[int, int], id_range: tuple[int, int],
        seed: int = 0, server_pid: int | None = None) -> dict:
    """``wrk`` against ``/infer``, one sequence per request (``bench/bodies.lua``); returns
    seq/s, latency percentiles in ms and errors (transport errors and non-2xx answers), and
    with ``server_pid`` the server's CPU time per request: unlike wall time, barely moved
    by other processes on a shared machine."""
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
               "-s", str(BODIES_SCRIPT), f"http://{HOST}:{PORT}", "--",
               str(lengths[0]), str(lengths[1]), str(id_range[0]), str(id_range[1]), str(seed)]
    cpu_before = cpu_seconds(server_pid) if server_pid else 0.0
    run = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    cpu = cpu_seconds(server_pid) - cpu_before if server_pid else None
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {run.stderr or run.stdout}")
    output = run.stdout
    summary = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    latency = summary["latency_us"]
    return {
        "seq_s": summary["requests"] / (summary["duration_us"] / 1e6),
        "requests": summary["requests"],
        "errors": sum(summary["errors"].values()),
        "p50_ms": latency["p50"] / 1000, "p90_ms": latency["p90"] / 1000,
        "p99_ms": latency["p99"] / 1000, "max_ms": latency["max"] / 1000,
        "server_cpu_ms_per_request": None if cpu is None else 1000 * cpu / max(summary["requests"], 1),
    }
