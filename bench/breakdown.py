"""Where a request's time goes.

- **A lone request, phase by phase** (16, 64, 256 and 2048 tokens): the real ASGI app
  (``app.main.create_app``, the default model, ``ENGINE=auto``, started through its
  lifespan) driven in process by a stub ASGI transport, with ``time.perf_counter_ns``
  wrappers that only this benchmark installs around the functions each phase runs:

  envelope + routing + body (the middleware, routing, reading the body: from the ASGI call to
  the parsing, less admission), parse + validate (orjson, pydantic, the input arrays: on the
  loop for a small body, else on the parsing thread), parsing hop (to the parsing thread and
  back; none for a small body),
  admission (pricing and the memory budget), queue hop (the parts handed to the batcher to
  the call's start: the queue and an engine thread's wake-up, or for a short call run on the
  loop, one turn of the loop), engine call (the runner on the engine thread: padding, ONNX
  Runtime, slicing), back hop (the call's end to the request's coroutine holding the
  results), encode (the JSON document), send (the encoded answer through the middleware to the
  transport), other (the rest of the total). Each figure is the median over the requests;
  the medians need not add up to the median total. No socket: the bare uvicorn figures of
  the benchmark are the floor of that.
- **Under load** (``wrk``, 32 connections, lengths 8..256, the service as users run it): the
  server's CPU time per request (``/proc/<pid>/stat`` utime + stime, and per thread: the event
  loop, the engine threads (nice 10), the rest), and the time per request a thread held the
  interpreter lock, sampled by ``py-spy record --gil`` (in a second run of the same load, so
  that the sampler's own CPU does not count in the first); where py-spy is missing or can't
  attach, that is said and only CPU time is given.

``python -m bench --breakdown-only`` runs this alone (under a minute);
``python -m bench.breakdown --in-process`` prints the in-process part as JSON.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = (16, 64, 256, 2048)
PHASES = ("envelope + routing + body", "parse + validate", "parsing hop", "admission", "queue hop",
          "engine call", "back hop", "encode", "send", "other")
TOTALS = ("total", "loop cpu", "parse cpu", "engine cpu")
SERVED_ENGINE = "auto"  # the breakdown follows what the service serves here
LOAD_CONNECTIONS = 32
MIXED = (8, 256)

# ---------------------------------------------------------------- the lone request, in process

_events: list[tuple[str, int, int]] = []  # (what, start ns, end ns) for the request in flight


def _record(what: str, start: int, end: int) -> None:
    _events.append((what, start, end))


def _replace_everywhere(original: object, replacement: object) -> int:
    """Put ``replacement`` wherever an ``app`` module holds ``original`` by name (modules that
    imported it with ``from ... import``); returns how many places."""
    places = 0
    for name, module in list(sys.modules.items()):
        if not (name == "app" or name.startswith("app.")) or module is None:
            continue
        for attribute, value in list(vars(module).items()):
            if value is original:
                setattr(module, attribute, replacement)
                places += 1
    return places


def _timed_function(what: str, function: Callable) -> Callable:
    """Wall time as ``what``, and the calling thread's CPU time as ``what cpu``."""
    @functools.wraps(function)
    def timed(*args, **kwargs):
        start, cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            return function(*args, **kwargs)
        finally:
            _record(what, start, time.perf_counter_ns())
            _record(what + " cpu", 0, time.thread_time_ns() - cpu)
    return timed


def _timed_coroutine(what: str, function: Callable) -> Callable:
    @functools.wraps(function)
    async def timed(*args, **kwargs):
        start = time.perf_counter_ns()
        try:
            return await function(*args, **kwargs)
        finally:
            _record(what, start, time.perf_counter_ns())
    return timed


def _timed_generator(what: str, function: Callable, mark_each: str | None = None) -> Callable:
    """An async generator whose own steps (each ``__anext__``) are timed as ``what``; with
    ``mark_each``, the moment each item reaches the consumer too."""
    @functools.wraps(function)
    async def timed(*args, **kwargs):
        inner = function(*args, **kwargs)
        try:
            while True:
                start = time.perf_counter_ns()
                try:
                    item = await inner.__anext__()
                except StopAsyncIteration:
                    _record(what, start, time.perf_counter_ns())
                    return
                now = time.perf_counter_ns()
                _record(what, start, now)
                if mark_each:
                    _record(mark_each, now, now)
                yield item
        finally:
            await inner.aclose()
    return timed


def install_timers() -> list[str]:
    """Wrap the functions each phase runs (in this process only); returns what could not be
    found (a phase then shows as '-')."""
    import app.api.dataplane as dataplane
    import app.api.inputs as inputs
    import app.api.json_body as json_body
    import app.api.streaming as streaming
    import app.engine.runner as runner
    import app.service.batcher as batcher
    import app.service.pricing as pricing

    missing = []
    for module, name, what in ((json_body, "parse_body", "parse"), (json_body, "check_value_count", "parse"),
                               (inputs, "input_arrays", "parse")):
        original = getattr(module, name, None)
        if original is None or not _replace_everywhere(original, _timed_function(what, original)):
            missing.append(f"{module.__name__}.{name}")
    original = getattr(dataplane, "parsed", None)
    if original is None or not _replace_everywhere(original, _timed_coroutine("parsed", original)):
        missing.append("app.api.dataplane.parsed")
    original = getattr(streaming, "infer_document", None)
    if original is None or not _replace_everywhere(original, _timed_generator("encode", original)):
        missing.append("app.api.streaming.infer_document")
    pricing.MemoryBudget.admit = _timed_coroutine("admission", pricing.MemoryBudget.admit)
    pricing.CostModel.price = _timed_function("admission", pricing.CostModel.price)
    stream = _timed_generator("stream", batcher.MicroBatcher.stream, "delivered")

    def marked_stream(self, parts):
        now = time.perf_counter_ns()
        _record("enqueued", now, now)
        return stream(self, parts)

    batcher.MicroBatcher.stream = marked_stream
    run = runner.Runner.run

    def timed_run(self, sequences):
        start, cpu = time.perf_counter_ns(), time.thread_time_ns()
        try:
            return run(self, sequences)
        finally:
            end = time.perf_counter_ns()
            _record("engine", start, end)
            _record("engine cpu", 0, time.thread_time_ns() - cpu)

    runner.Runner.run = timed_run
    return missing


class StubTransport:
    """Just enough of an ASGI server to drive the app: its lifespan, and one request at a time
    with the whole body in one message; the answer is collected, its end time-stamped."""

    def __init__(self, app) -> None:
        self.app = app
        self.state: dict = {}
        self._shutdown = asyncio.Event()
        self._lifespan: asyncio.Task | None = None

    async def start(self) -> None:
        started = asyncio.get_running_loop().create_future()
        messages = [{"type": "lifespan.startup"}]

        async def receive():
            if messages:
                return messages.pop()
            await self._shutdown.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message):
            if message["type"] == "lifespan.startup.complete":
                started.set_result(None)
            elif message["type"] == "lifespan.startup.failed":
                started.set_exception(RuntimeError(message.get("message")))

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.3"}, "state": self.state}
        self._lifespan = asyncio.create_task(self.app(scope, receive, send))
        await started

    async def stop(self) -> None:
        self._shutdown.set()
        if self._lifespan is not None:
            await asyncio.wait([self._lifespan], timeout=30)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes, int]:
        """Status, body and the ``perf_counter_ns`` at which the answer's last byte was sent."""
        done = asyncio.Event()
        sent = [False]
        answer: dict = {"status": 0, "body": [], "end": 0}

        async def receive():
            if not sent[0]:
                sent[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
            elif message["type"] == "http.response.body":
                answer["body"].append(message.get("body", b""))
                if not message.get("more_body", False):
                    answer["end"] = time.perf_counter_ns()
                    done.set()

        headers = [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "root_path": "", "headers": headers,
                 "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000), "state": dict(self.state)}
        await self.app(scope, receive, send)
        done.set()
        return answer["status"], b"".join(answer["body"]), answer["end"]


def phases_of(events: list[tuple[str, int, int]], start: int, end: int) -> dict[str, float | None]:
    """One request's phases in ms, from its events (None: not seen)."""
    def total(what: str) -> int | None:
        spans = [e - s for name, s, e in events if name == what]
        return sum(spans) if spans else None

    def first(what: str, edge: int) -> int | None:
        return next((event[edge] for event in events if event[0] == what), None)

    def last(what: str, edge: int) -> int | None:
        return next((event[edge] for event in reversed(events) if event[0] == what), None)

    off_loop_start, parse, off_loop = first("parsed", 1), total("parse"), total("parsed")
    admission = total("admission") or 0
    early_admission = sum(e - s for name, s, e in events
                          if name == "admission" and off_loop_start is not None and e <= off_loop_start)
    enqueued, engine_start, engine_end = first("enqueued", 1), first("engine", 1), first("engine", 2)
    delivered, encode_end = first("delivered", 1), last("encode", 2)
    ns: dict[str, int | None] = {
        "envelope + routing + body": (off_loop_start - start - early_admission
                                      if off_loop_start is not None else None),
        "parse + validate": parse,
        "parsing hop": off_loop - parse if off_loop is not None and parse is not None else None,
        "admission": admission,
        "queue hop": engine_start - enqueued if engine_start and enqueued else None,
        "engine call": total("engine"),
        "back hop": delivered - engine_end if delivered and engine_end else None,
        "encode": total("encode"),
        "send": end - encode_end if encode_end else None,
    }
    known = sum(v for v in ns.values() if v is not None)
    ns["other"] = (end - start) - known
    ms: dict[str, float | None] = {k: None if v is None else v / 1e6 for k, v in ns.items()}
    ms["total"] = (end - start) / 1e6
    for what in ("engine cpu", "parse cpu", "loop cpu"):
        cpu = total(what)
        ms[what] = None if cpu is None else cpu / 1e6
    return ms


async def _lone_requests(quick: bool) -> dict:
    os.environ.update({"ENGINE": SERVED_ENGINE, "GRPC_PORT": "0"})
    from app.config import Settings
    from app.main import create_app

    app = create_app(Settings())
    devnull = open(os.devnull, "w")  # noqa: SIM115  # the access log is formatted, as served, and dropped
    for name in ("app", "uvicorn", "uvicorn.error"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(devnull)
    missing = install_timers()
    transport = StubTransport(app)
    await transport.start()
    try:
        deadline = time.perf_counter() + 120
        while (await transport.request("GET", "/readyz"))[0] != 200:
            if time.perf_counter() > deadline:
                raise RuntimeError("the app never became ready")
            await asyncio.sleep(0.05)
        spec = app.state.repository.default().bundle.spec
        low, high = spec.input.id_range
        rng = np.random.default_rng(0)
        rows = {}
        for n in LENGTHS:
            count = (40 if n <= 256 else 8) if quick else (300 if n <= 64 else 120 if n <= 256 else 30)
            bodies = [json.dumps({"sequences": [rng.integers(max(low, 2), high, n).tolist()]}).encode()
                      for _ in range(8)]
            for body in bodies[:3]:  # the first requests at a length: one-off costs
                await transport.request("POST", "/infer", body)
            samples = []
            for i in range(count):
                _events.clear()
                start, loop_cpu = time.perf_counter_ns(), time.thread_time_ns()
                status, _, end = await transport.request("POST", "/infer", bodies[i % len(bodies)])
                _record("loop cpu", 0, time.thread_time_ns() - loop_cpu)
                if status != 200:
                    raise RuntimeError(f"/infer answered {status}")
                samples.append(phases_of(list(_events), start, end))
            rows[n] = {key: _median([s[key] for s in samples]) for key in (*PHASES, *TOTALS)}
            rows[n]["n"] = count
        return {"lone": rows, "missing": missing}
    finally:
        await transport.stop()


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def in_process(quick: bool) -> dict:
    """The lone-request breakdown, in a process of its own (the app sets glibc's policy and
    loads its engine there, not in the benchmark's process)."""
    command = [sys.executable, "-m", "bench.breakdown", "--in-process"] + (["--quick"] if quick else [])
    env = {**os.environ, "ENGINE": SERVED_ENGINE, "GRPC_PORT": "0"}
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"the in-process breakdown failed: {run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- under load: CPU and the GIL

def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each group of the process's threads: the event loop (the main thread),
    the engine threads (they run at nice 10), the rest (parsing, the default executor, ...)."""
    from bench.server import cpu_seconds, stat_fields

    groups = {"event loop": 0.0, "engine threads": 0.0, "other threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = stat_fields(pid, int(task.name))
        except OSError:
            continue  # the thread ended
        seconds = cpu_seconds(pid, fields=fields)
        nice = int(fields[16])
        group = ("event loop" if int(task.name) == pid else "engine threads" if nice > 0 else "other threads")
        groups[group] += seconds
    return groups


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def gil_samples(path: Path) -> dict[str, int]:
    """Samples per kind of thread in a ``py-spy record --threads --format raw`` file: one stack
    a line, ``thread (<tid>): <name>`` first and the count last; the event loop runs in
    ``MainThread``, engine calls in ``engine_<n>``, parsing in ``body-parsing_0``."""
    kinds = {"event loop": 0, "engine threads": 0, "other threads": 0}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        name = stack.split(";", 1)[0].partition("): ")[2]
        kind = ("event loop" if name == "MainThread" else "engine threads" if name.startswith("engine")
                else "other threads")
        kinds[kind] += int(count)
    return kinds


def under_load(id_range: tuple[int, int], quick: bool) -> dict:
    from bench.server import cpu_seconds, start_server, stop, wrk

    seconds = 3 if quick else 6
    process, _ = start_server({"ENGINE": SERVED_ENGINE})
    try:
        wrk(LOAD_CONNECTIONS, 1, MIXED, id_range, seed=99)  # connections, first calls at each bucket
        before, threads_before = cpu_seconds(process.pid), thread_cpu(process.pid)
        row = wrk(LOAD_CONNECTIONS, seconds, MIXED, id_range, seed=LOAD_CONNECTIONS)
        cpu, threads_after = cpu_seconds(process.pid) - before, thread_cpu(process.pid)
        requests = max(row["requests"], 1)
        result = {"connections": LOAD_CONNECTIONS, "seconds": seconds, "seq_s": row["seq_s"],
                  "requests": row["requests"], "errors": row["errors"],
                  "cpu_ms_per_request": 1000 * cpu / requests,
                  "cpu_ms_per_request_by_thread": {k: 1000 * (threads_after[k] - threads_before[k]) / requests
                                                   for k in threads_after}}
        result["gil"] = _gil_under_load(process.pid, seconds, id_range)
    finally:
        stop(process)
    return result


def _gil_under_load(pid: int, seconds: int, id_range: tuple[int, int]) -> dict:
    """GIL-held ms per request over a second run of the same load, sampled by py-spy."""
    from bench.server import wrk

    spy = py_spy()
    if spy is None:
        return {"error": "py-spy is not installed (pip install py-spy): CPU time only"}
    rate = 250
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gil.txt"
        sampler = subprocess.Popen([spy, "record", "--gil", "--threads", "--nonblocking", "--rate", str(rate),
                                    "--duration", str(seconds + 2), "--format", "raw", "-o", str(out),
                                    "--pid", str(pid)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        time.sleep(1)  # attached before the load starts
        if sampler.poll() is not None:
            return {"error": f"py-spy could not attach: {sampler.stderr.read().strip().splitlines()[0]}"}
        row = wrk(LOAD_CONNECTIONS, seconds, MIXED, id_range, seed=LOAD_CONNECTIONS + 1)
        try:
            _, err = sampler.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            sampler.kill()
            return {"error": "py-spy did not finish"}
        if not out.exists():
            return {"error": f"py-spy wrote nothing: {err.strip()[-300:]}"}
        kinds = gil_samples(out)
        if os.environ.get("BENCH_KEEP_GIL_PROFILE"):
            shutil.copy(out, os.environ["BENCH_KEEP_GIL_PROFILE"])
    requests = max(row["requests"], 1)
    # The sampler ran a second before and after the load too: an idle server waits in epoll,
    # without the lock, so with --gil those seconds add no samples.
    return {"rate_hz": rate, "requests": row["requests"], "seq_s": row["seq_s"],
            "gil_ms_per_request": 1000 * sum(kinds.values()) / rate / requests,
            "gil_ms_per_request_by_thread": {k: 1000 * v / rate / requests for k, v in kinds.items()}}


def run(id_range: tuple[int, int], quick: bool) -> dict:
    before = os.getloadavg()
    lone = in_process(quick)
    return {"lone": lone["lone"], "missing": lone["missing"], "load": under_load(id_range, quick),
            "load_average_before": before, "load_average_after": os.getloadavg(), "quick": quick}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-process", action="store_true", help="only the lone-request part, as JSON")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.in_process:
        result = asyncio.run(_lone_requests(args.quick))
        print(json.dumps(result))
        os._exit(0)  # the app's threads are daemonic, but not all of the engine's libraries are
    from app.formats.bundle import load_bundle

    low, high = load_bundle(ROOT / "models" / "segmenter").spec.input.id_range  # type: ignore[union-attr]
    print(json.dumps(run((max(2, low), high), args.quick), indent=2))


if __name__ == "__main__":
    main()
