"""Production behaviour: request ids, metrics, logs, body limits, overload, deadlines, shutdown."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, Server
from tests.helpers import max_diff


@pytest.fixture(scope="module")
def small_server():
    """Tight limits, to reach them cheaply."""
    server = Server({"MAX_BODY_BYTES": "16384", "MAX_QUEUE": "16", "WORKERS": "2", "DRAIN_DELAY_S": "0"},
                    serve=True)
    server.wait_until()
    yield server
    server.stop()


SEGMENTER = '{model="segmenter",version="1"}'  # the labels of the default model's series

def test_request_id_is_echoed_generated_and_in_error_bodies(small_server: Server) -> None:
    given = httpx.post(small_server.url + "/infer", json={"sequences": [[2, 3]]},
                       headers={"X-Request-ID": "trace-42"})
    assert given.headers["x-request-id"] == "trace-42"
    generated = httpx.post(small_server.url + "/infer", json={"sequences": [[2, 500]]})
    assert len(generated.headers["x-request-id"]) == 32
    assert generated.json()["error"]["request_id"] == generated.headers["x-request-id"]
    hostile = httpx.get(small_server.url + "/healthz", headers={"X-Request-ID": "a\tb" * 100})
    assert hostile.headers["x-request-id"] != "a\tb" * 100


def test_body_limit_answers_413_before_parsing(small_server: Server) -> None:
    big = b'{"sequences": [[' + b",".join([b"7"] * 9000) + b"]]}"
    response = httpx.post(small_server.url + "/infer", content=big,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["type"] == "body_too_large"

    def chunks():  # no Content-Length: the limit still holds while streaming
        for _ in range(20):
            yield b" " * 1000 * 1000

    streamed = httpx.post(small_server.url + "/infer", content=chunks())
    assert streamed.status_code == 413
    assert httpx.get(small_server.url + "/readyz").status_code == 200


def test_metrics_separate_queueing_from_compute(small_server: Server) -> None:
    for length in (5, 50, 500):
        httpx.post(small_server.url + "/infer", json={"sequences": [[3] * length]})
    text = httpx.get(small_server.url + "/metrics").text
    for name in ("bigru_http_requests_total{method=\"POST\",route=\"/infer\",status=\"200\"}",
                 "bigru_http_request_duration_seconds_bucket", "bigru_queue_wait_seconds_count",
                 "bigru_engine_compute_seconds_count", "bigru_engine_batch_sequences_bucket",
                 "bigru_sequence_tokens_bucket", "bigru_http_requests_in_flight",
                 "bigru_queue_sequences", "bigru_model_info{", "bigru_ready 1.0"):
        assert name in text, name
    assert 'source_format="keras2-h5-model"' in text
    assert 'bigru_sequence_tokens_bucket{le="512.0",model="segmenter",version="1"} ' in text
    assert 'bigru_model_ready{model="segmenter",version="1"} 1.0' in text


def post_many(url: str, bodies: list[dict], timeout: float = 30) -> list[tuple[int, float, dict]]:
    """Every body at once; (status, seconds, parsed answer) for each, in order."""
    async def run() -> list[tuple[int, float, dict]]:
        limits = httpx.Limits(max_connections=len(bodies))
        async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
            async def one(body: dict) -> tuple[int, float, dict]:
                start = time.perf_counter()
                response = await client.post("/infer", json=body)
                return response.status_code, time.perf_counter() - start, response.json()

            return await asyncio.gather(*[one(b) for b in bodies])

    return asyncio.run(run())


@pytest.mark.alone  # its 503s must come within 5 s: not beside another worker's TensorFlow
def test_flood_gets_correct_200s_or_fast_503s(small_server: Server, gpu_reference: dict) -> None:
    """Far more than MAX_QUEUE at once, of sequences whose GPU outputs we have: every 200
    carries exactly the GPU's numbers for its own sequences, every other answer is a 503."""
    rng = np.random.default_rng(0)
    picks = [rng.choice(len(gpu_reference["ids"]), 4, replace=False) for _ in range(150)]
    bodies = [{"sequences": [gpu_reference["ids"][i].tolist() for i in pick]} for pick in picks]
    refused_before = refused_as_full(small_server)
    results = post_many(small_server.url, bodies)
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, set(statuses)
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    for (status, _, answer), pick in zip(results, picks):
        if status == 200:
            expected = [gpu_reference["probs_fp32"][i] for i in pick]
            assert max_diff([np.asarray(o, np.float32) for o in answer["outputs"]], expected) <= 1e-4
        else:
            assert answer["error"]["type"] == "overloaded"
    rejected = [seconds for status, seconds, _ in results if status == 503]
    assert max(rejected) < 5.0
    assert float(np.percentile([seconds for _, seconds, _ in results], 99)) < 10.0
    assert httpx.get(small_server.url + "/readyz").status_code == 200
    assert refused_as_full(small_server) - refused_before == statuses.count(503)


def refused_as_full(server: Server) -> float:
    """The ``bigru_rejected_requests_total{reason="queue_full"}`` counter (absent until the
    first refusal)."""
    return server.metric('bigru_rejected_requests_total{reason="queue_full"}', 0.0)


def test_overloaded_answer_says_when_to_retry(small_server: Server) -> None:
    bodies = [{"sequences": [[5] * 800] * 8} for _ in range(12)]
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=small_server.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/infer", json=b) for b in bodies])

    responses = asyncio.run(run())
    overloaded = [r for r in responses if r.status_code == 503]
    assert overloaded, "MAX_QUEUE=16 must refuse 96 queued sequences"
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "overloaded"
               for r in overloaded)


def test_deadline_gives_504_and_the_service_goes_on() -> None:
    server = Server({"REQUEST_TIMEOUT_S": "0.005"})
    try:
        server.wait_until()
        response = httpx.post(server.url + "/infer", json={"sequences": [[4] * 2048] * 16}, timeout=30)
        assert response.status_code == 504 and response.json()["error"]["type"] == "deadline_exceeded"
        assert httpx.get(server.url + "/readyz").status_code == 200
    finally:
        server.stop()


def test_queued_work_past_its_deadline_is_dropped_not_run() -> None:
    """One worker busy with a long request; a short one queued behind it times out too. The
    long one was already computing and finishes; the short one's work never reaches the
    engine: the engine's own histogram counts only the sequences it ran. (The heavy request
    runs as one engine call of 64 x 2048 tokens on one thread, about a second: one part, one
    batch.)"""
    server = Server({"REQUEST_TIMEOUT_S": "0.3", "WORKERS": "1", "THREADS": "1", "MAX_BATCH_SIZE": "64",
                     "MAX_BATCH_TOKENS": str(64 * 2048), "MEMORY_BUDGET_BYTES": str(4 << 30)})
    try:
        server.wait_until()

        async def run() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                heavy = asyncio.ensure_future(client.post("/infer", json={"sequences": [[4] * 2048] * 64}))
                # its lengths counted: parsed, so queued before the light one arrives (the memory
                # held for its body shows earlier, while the light one could still run in place)
                counted = "bigru_sequence_tokens_count" + SEGMENTER + " 64.0"
                while counted not in (await client.get("/metrics")).text:
                    await asyncio.sleep(0.01)
                light = await client.post("/infer", json={"sequences": [[5, 6, 7]]})
                return [(await heavy).status_code, light.status_code]

        assert asyncio.run(run()) == [504, 504]
        deadline = time.monotonic() + 120
        while server.metric("bigru_engine_batch_sequences_count" + SEGMENTER, 0.0) < 1:  # the heavy call ends
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert len(httpx.post(server.url + "/infer", json={"sequences": [[8]]}).json()["outputs"]) == 1
        assert server.metric("bigru_engine_batch_sequences_count" + SEGMENTER) == 2  # heavy, then the last
        assert server.metric("bigru_engine_batch_sequences_sum" + SEGMENTER) == 64 + 1  # not the light one's
        assert server.metric('bigru_rejected_requests_total{reason="deadline"}') == 2
    finally:
        server.stop()


def test_probes_and_metrics_stay_out_of_the_log(small_server: Server) -> None:
    for path in ("/healthz", "/readyz", "/metrics"):
        httpx.get(small_server.url + path)
    httpx.post(small_server.url + "/infer", json={"sequences": [[9]]}, headers={"X-Request-ID": "logged-1"})
    httpx.post(small_server.url + "/infer", json={"sequences": [[9]]}, headers={"X-Request-ID": "logged-2"})
    deadline = time.monotonic() + 10  # the line is written once the response has gone out
    while not any(r.get("request_id") == "logged-2" for r in small_server.log_records()):
        assert time.monotonic() < deadline, small_server.output()
        time.sleep(0.05)
    lines = [line for line in small_server.log_records() if line.get("message") == "request"]
    assert any(line["request_id"] == "logged-1" and line["status"] == 200 and "duration_ms" in line
               for line in lines)
    assert not any(line["path"] in ("/healthz", "/readyz", "/metrics") for line in lines)


def test_sigterm_drains_then_finishes_every_accepted_request() -> None:
    server = Server({"DRAIN_DELAY_S": "3", "GRACE_PERIOD_S": "20", "WORKERS": "1"}, serve=True)
    server.wait_until()
    results: list[int] = []

    def client() -> None:
        try:
            response = httpx.post(server.url + "/infer", json={"sequences": [[6] * 2048] * 8}, timeout=60)
            results.append(response.status_code)
        except httpx.HTTPError as exc:
            results.append(-1)
            raise AssertionError(exc) from exc

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # the requests are in flight, most of them queued
    sent_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    draining = httpx.get(server.url + "/readyz")
    assert draining.status_code == 503 and draining.json()["stage"] == "draining"
    assert httpx.get(server.url + "/healthz").status_code == 200
    for thread in threads:
        thread.join(timeout=60)
    assert results == [200] * 6
    code = server.process.wait(timeout=30)
    assert time.monotonic() - sent_at < 20
    assert code in (0, -signal.SIGTERM)
    output = server.output()
    assert "draining" in output and "stopped" in output


STRACE = shutil.which("strace") or shutil.which("strace", path="/usr/bin:/usr/sbin")
WRITING_CALLS = ("open,openat,openat2,creat,truncate,rename,renameat,renameat2,link,linkat,symlink,"
                 "symlinkat,unlink,unlinkat,mkdir,mkdirat,rmdir,mknod,mknodat")
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
WRITABLE = ("/tmp/", "/dev/", "/proc/")
CALL = re.compile(r"^\d+\s+(\w+)\((.*)\)\s+=\s+")
PATH = re.compile(r'(?:(?:AT_FDCWD|\d+)<([^>]*)>,\s*)?"([^"]*)"')


def traced(trace: Path) -> tuple[str, ...]:
    """The command prefix that records every writing system call of a process tree."""
    if STRACE is None:
        pytest.fail("strace is not installed; .ci/run installs it (apt-get install strace)")
    return STRACE, "-f", "--seccomp-bpf", "-qq", "-y", "-o", str(trace), "-e", f"trace={WRITING_CALLS}"


def paths_written(trace: str, cwd: Path) -> list[str]:
    """Every path that ``strace -f -y`` saw created, opened for writing, renamed, linked or
    removed (attempts included: on a read-only root filesystem they fail)."""
    written = []
    for line in trace.splitlines():
        call = CALL.match(line)
        if call is None:
            continue
        name, args = call.groups()
        if name.startswith("open") and not any(flag in args for flag in WRITE_FLAGS):
            continue
        paths = [os.path.join(directory or cwd, path) for directory, path in PATH.findall(args)]
        written += paths[1:] if name.startswith("symlink") else paths  # a link's target is only text
    return [os.path.normpath(p) for p in written]


SERVE_ENV = {"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1",
             "MAX_LEN": "8"}  # one length bucket: the keras engine compiles one shape
# A private mount namespace whose root filesystem is read-only, with an empty /tmp: the
# container's securityContext (readOnlyRootFilesystem, an emptyDir on /tmp).
# A checkout (and its .venv) under /tmp stays visible, and so does a conversion cache given as
# KEPT_CACHE: each is bound back, read-only, over the tmpfs.
READ_ONLY_ROOT = ("unshare", "--mount", "--propagation", "private", "sh", "-c",
                  'mount --bind /tmp /mnt && mount -o remount,bind,ro / && '
                  'mount -t tmpfs -o size=256m tmpfs /tmp && '
                  'for kept in "$CHECKOUT" "$KEPT_CACHE"; do case "$kept" in /tmp/*) mkdir -p "$kept" && '
                  'mount --bind -o ro "/mnt${kept#/tmp}" "$kept";; esac; done && exec "$@"', "sh")


def exercise(server: Server) -> None:
    server.wait_until(timeout=180)
    assert httpx.post(server.url + "/infer", json={"sequences": [[5, 6, 7]]}).status_code == 200
    for path in ("/metrics", "/v1/model", "/openapi.json", "/docs"):
        assert httpx.get(server.url + path).status_code == 200


def test_service_writes_nothing_outside_tmp(tmp_path: Path) -> None:
    """Every path the process tree creates, opens for writing, renames or removes, traced at
    the system-call level, so writes from native code (HDF5, ONNX Runtime) count too."""
    # The conversion (a TensorFlow child process) first, untraced: tracing TensorFlow's start-up
    # takes minutes on 2 cores; the read-only-root test below covers that child.
    subprocess.run([sys.executable, "-m", "app", "convert"], cwd=ROOT, check=True, capture_output=True)
    trace = tmp_path / "trace.txt"
    server = Server(SERVE_ENV, serve=True, prefix=traced(trace))
    try:
        exercise(server)
    finally:
        server.stop()
    traced_calls = trace.read_text()
    assert "openat(" in traced_calls, "the trace saw nothing"  # (its parser: the test below)
    written = paths_written(traced_calls, ROOT)
    assert [p for p in written if not (p + "/").startswith(WRITABLE)] == []


def with_short_checks(entry: Path, directory: Path, longest: int) -> Path:
    """A copy of a converted directory whose check data (the GPU's and the Keras model's
    outputs) keeps only the sequences of up to ``longest`` steps, signed again."""
    from app.convert.directory import write_integrity

    shutil.copytree(entry, directory)
    for name in ("parity.npz", "keras_outputs.npz"):
        with np.load(directory / name) as data:
            arrays = {key: data[key] for key in data.files}
        lengths = arrays.pop("lengths")
        kept = lengths <= longest
        cuts = np.cumsum(lengths)[:-1]
        np.savez(directory / name, lengths=lengths[kept], **{
            key: np.concatenate([part for part, keep in zip(np.split(array, cuts), kept) if keep])
            for key, array in arrays.items()})
    write_integrity(directory)
    return directory


@pytest.mark.parametrize("engine", ["auto", "keras"])
def test_service_runs_on_a_read_only_root_filesystem(engine: str, tmp_path: Path,
                                                     default_converted: Path) -> None:
    """The engines start, self-check, warm up and serve with only /tmp writable: ``auto``
    converts first (the fresh /tmp holds no cache); ``keras`` runs TensorFlow in the server,
    on a cache hit in a read-only cache (the init container's, mounted read-only), whose check
    data stops at MAX_LEN: the keras engine compiles one length, not ten. (Tracing
    TensorFlow's start-up with strace takes minutes on 2 cores; this checks the outcome.)"""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is not installed")
    env = SERVE_ENV | {"ENGINE": engine, "CHECKOUT": str(ROOT)}
    if engine == "keras":
        cache = tmp_path / "cache"
        with_short_checks(default_converted, cache / default_converted.name, int(SERVE_ENV["MAX_LEN"]))
        env |= {"KEPT_CACHE": str(cache), "MODEL_CACHE_DIR": str(cache)}
    server = Server(env, serve=True, prefix=READ_ONLY_ROOT)
    try:
        exercise(server)
        if engine == "keras":
            checked = httpx.get(server.url + "/v1/model").json()["self_check"]
            assert checked["passed"] and checked["sequences"] == 2  # of 1 and 7 steps
    finally:
        output = server.stop()
    assert "Read-only file system" not in output
    assert ("cache hit" in output) == (engine == "keras"), output


def test_the_write_audit_sees_native_and_relative_writes(tmp_path: Path) -> None:
    """The audit's own check: a native library's write (SQLite, in C) in a directory opened
    by descriptor, a relative path, a rename and an unlink are all reported."""
    trace = tmp_path / "trace.txt"
    script = ("import os, sqlite3\n"
              "sqlite3.connect('db.sqlite').execute('create table t (x)').connection.commit()\n"
              "os.rename('db.sqlite', 'moved.sqlite'); os.unlink('moved.sqlite')\n"
              "fd = os.open('.', os.O_RDONLY)\n"
              "os.close(os.open('by-fd', os.O_WRONLY | os.O_CREAT, dir_fd=fd))\n")
    subprocess.run([*traced(trace), sys.executable, "-c", script], cwd=tmp_path, check=True)
    written = set(paths_written(trace.read_text(), tmp_path))
    for name in ("db.sqlite", "moved.sqlite", "db.sqlite-journal", "by-fd"):
        assert str(tmp_path / name) in written, (name, written)
