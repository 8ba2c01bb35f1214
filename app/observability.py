"""Prometheus metrics and structured JSON logs."""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sys
import threading
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from pythonjsonlogger.orjson import OrjsonFormatter

disable_created_metrics()  # the *_created series only add noise to every scrape

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


@dataclass(frozen=True)
class BatchStats:
    """What one engine call did, for metrics."""

    jobs: int
    sequences: int
    queue_wait_s: list[float]
    compute_s: float


class Metrics:
    """All of the service's metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bigru_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("bigru_http_request_duration_seconds", "time to answer a request",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("bigru_http_requests_in_flight", "requests being answered", registry=r)
        model = ["model", "version"]  # a model's name and version number
        self.queue_wait = Histogram("bigru_queue_wait_seconds", "time a request waited for the engine",
                                    model, buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("bigru_engine_compute_seconds", "time of one engine call (a batch)",
                                 model, buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("bigru_engine_batch_sequences", "sequences in one engine call",
                                    model, buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.sequence_length = Histogram("bigru_sequence_tokens", "tokens per requested sequence",
                                         model, buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                                         registry=r)
        self.queue_depth = Gauge("bigru_queue_sequences", "sequences waiting for the engine", model,
                                 registry=r)
        self.memory_used = Gauge("bigru_memory_budget_used_bytes",
                                 "memory reserved by the /infer requests admitted", registry=r)
        self.memory_waiting = Gauge("bigru_memory_budget_waiting_bytes",
                                    "input held by the requests waiting for room in the budget", registry=r)
        self.rejected = Counter("bigru_rejected_requests", "requests refused before compute, by reason",
                                ["reason"], registry=r)
        self.model_info = Gauge("bigru_model_info", "each model version loaded (value 1); version: "
                                "the service's", ["name", "model_version", "version", "source_format",
                                                  "conversion", "engine"], registry=r)
        self.self_check_diff = Gauge("bigru_self_check_max_abs_diff",
                                     "the self-check's max abs difference at load", model, registry=r)
        self.ready = Gauge("bigru_ready", "1 when the service is ready", registry=r)
        self.model_ready = Gauge("bigru_model_ready", "1 while a model version serves", model, registry=r)
        self.grpc_requests = Counter("bigru_grpc_requests", "gRPC calls by method and status code",
                                     ["method", "code"], registry=r)
        self.grpc_latency = Histogram("bigru_grpc_request_duration_seconds", "time to answer a gRPC call",
                                      ["method"], buckets=LATENCY_BUCKETS, registry=r)

    def observe_batch(self, stats: BatchStats, model: str, version: str) -> None:
        self.compute.labels(model, version).observe(stats.compute_s)
        self.batch_size.labels(model, version).observe(stats.sequences)
        queue_wait = self.queue_wait.labels(model, version)
        for wait in stats.queue_wait_s:
            queue_wait.observe(wait)


def _drop_color_message(record: logging.LogRecord) -> bool:
    record.__dict__.pop("color_message", None)  # uvicorn's ANSI-coloured copy of the message
    return True


ACCESS_LOG = "app.access"  # a line per request (HTTP and gRPC)
GATHER_S = 0.01  # the access log's lines are written this much later at most


class WrittenAside(logging.handlers.QueueHandler):
    """The access log's records are formatted and written by a thread of their own, the lines
    of ``GATHER_S`` per write: the caller (the event loop) pays for the record alone, and the
    writer takes the interpreter lock a hundred times a second at most, not once per request
    (a lone request's path would otherwise wait for it). Every other record (start-up, state
    changes, errors: few) is written at once, once the lines logged before it are: the order
    of lines is kept, and the last lines before an exit are out even when the process then
    dies of a signal (as uvicorn ends after SIGTERM). :meth:`flush` waits until what was
    logged before it is written; :meth:`close` (``logging.shutdown``) writes what is left and
    stops the thread. A forked child starts a thread of its own."""

    def __init__(self, target: logging.StreamHandler) -> None:  # type: ignore[type-arg]
        super().__init__(queue.SimpleQueue())
        self.target = target
        self._pid = -1
        self._thread: threading.Thread | None = None
        self._urgent = threading.Event()  # a flush or close is queued: write now

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == ACCESS_LOG:
            super().emit(record)
            return
        self.flush()
        self.target.handle(record)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The record as it is (formatted later), its message fixed now: its arguments may change."""
        if record.args:
            record.msg, record.args = record.getMessage(), None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        if self._pid != os.getpid():
            self._start()
        self.queue.put_nowait(record)

    def _start(self) -> None:
        with _writers_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._write, name="log-writer", daemon=True)
            self._thread.start()

    def _write(self) -> None:
        target, stream = self.target, self.target.stream
        while True:
            batch = [self.queue.get()]
            if isinstance(batch[0], logging.LogRecord):
                self._urgent.wait(GATHER_S)
            self._urgent.clear()
            while True:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            lines, done, stop = [], [], False
            for item in batch:
                if isinstance(item, threading.Event):
                    done.append(item)
                elif item is None:
                    stop = True
                elif target.filter(item):
                    try:
                        lines.append(target.format(item) + target.terminator)
                    except Exception:
                        target.handleError(item)
            if lines:
                try:
                    stream.write("".join(lines))
                    stream.flush()
                except Exception:
                    target.handleError(batch[-1])
            for event in done:
                event.set()
            if stop:
                return

    def flush(self) -> None:
        """Wait (a few seconds at most) until every record logged so far is written."""
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            written = threading.Event()
            self.queue.put_nowait(written)
            self._urgent.set()
            written.wait(5)

    def close(self) -> None:
        """Write what is queued and stop the thread (a record logged later starts another)."""
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            self.queue.put_nowait(None)
            self._urgent.set()
            thread.join(5)
        self._pid = -1
        super().close()


_writers_lock = threading.Lock()
_writer: WrittenAside | None = None


def configure_logging(level: str, fmt: str) -> None:
    """One JSON object per line on stderr for the service's and uvicorn's loggers; the
    access log's lines formatted and written aside (:class:`WrittenAside`)."""
    global _writer
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_drop_color_message)
    if fmt == "json":
        handler.setFormatter(OrjsonFormatter(  # half json's time: the writer holds the interpreter lock less
            "{asctime}{levelname}{name}{message}", style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    writer = WrittenAside(handler)
    for name in ("app", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [writer]
        logger.propagate = False
        logger.setLevel(level.upper())
    logging.getLogger("uvicorn.access").disabled = True  # one line per request comes from us
    # No line shows the caller's file, function or line: finding them walks the stack per record.
    logging._srcfile = None  # type: ignore[attr-defined]
    previous, _writer = _writer, writer
    if previous is not None:
        previous.close()  # what it holds is written first
