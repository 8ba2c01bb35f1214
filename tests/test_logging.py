"""The log as :func:`app.observability.configure_logging` writes it: the access log's lines
formatted and written by a thread of their own, every other line at once after them; the
order of lines kept, nothing lost at shutdown, the same JSON fields."""

from __future__ import annotations

import io
import json
import logging
import sys
import threading
from collections.abc import Iterator

import pytest

from app.observability import WrittenAside, configure_logging

FIELDS = {"request_id": "r1", "method": "POST", "path": "/infer", "status": 200, "duration_ms": 1.5,
          "client": "127.0.0.1", "model": "m", "model_version": "1"}


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    captured = io.StringIO()
    monkeypatch.setattr(sys, "stderr", captured)
    loggers = [logging.getLogger(name) for name in ("app", "uvicorn", "uvicorn.error")]
    before = [(logger.handlers, logger.level, logger.propagate) for logger in loggers]
    configure_logging("info", "json")
    try:
        yield captured
    finally:
        writer()[0].close()
        for logger, (handlers, level, propagate) in zip(loggers, before):
            logger.handlers, logger.level, logger.propagate = handlers, level, propagate


def writer() -> list[WrittenAside]:
    return [h for h in logging.getLogger("app").handlers if isinstance(h, WrittenAside)]


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_an_access_line_has_every_field_and_is_written_aside(stream: io.StringIO) -> None:
    logging.getLogger("app.access").info("request", extra=FIELDS)
    (handler,) = writer()
    handler.flush()
    (line,) = lines(stream)
    assert list(line) == ["time", "level", "logger", "message", *FIELDS]
    assert line | {"time": None} == {"time": None, "level": "INFO", "logger": "app.access",
                                     "message": "request", **FIELDS}
    assert handler._thread is not None and handler._thread is not threading.current_thread()


def test_other_lines_go_out_at_once_after_the_access_lines_before_them(stream: io.StringIO) -> None:
    access, service = logging.getLogger("app.access"), logging.getLogger("app.service")
    for i in range(200):
        access.info("request", extra={**FIELDS, "request_id": f"a{i}"})
    service.info("stopped %s", "now")  # no flush: a process may die of a signal right after
    written = lines(stream)
    assert [line.get("request_id") for line in written[:-1]] == [f"a{i}" for i in range(200)]
    assert written[-1]["message"] == "stopped now"


def test_shutdown_writes_what_is_queued(stream: io.StringIO) -> None:
    for i in range(500):
        logging.getLogger("app.access").info("request", extra={**FIELDS, "request_id": f"a{i}"})
    writer()[0].close()  # as logging.shutdown does at exit
    assert [line["request_id"] for line in lines(stream)] == [f"a{i}" for i in range(500)]


def test_a_message_is_fixed_when_logged(stream: io.StringIO) -> None:
    changing = ["before"]
    logging.getLogger("app.access").warning("client %s", changing)
    changing[0] = "after"
    writer()[0].flush()
    assert lines(stream)[0]["message"] == "client ['before']"


def test_access_lines_are_gathered_into_one_write_after_the_gather_time(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The writer takes the interpreter lock once per GATHER_S, not once per request."""
    import time

    from app.observability import GATHER_S

    writes: list[float] = []
    write = stream.write
    monkeypatch.setattr(stream, "write", lambda text: (writes.append(time.monotonic()), write(text))[1])
    access = logging.getLogger("app.access")
    start = time.monotonic()
    for i in range(3):
        access.info("request", extra={**FIELDS, "request_id": f"a{i}"})
    while not writes and time.monotonic() < start + 5:
        time.sleep(0.005)
    time.sleep(GATHER_S)
    assert len(writes) == 1 and GATHER_S * 0.9 <= writes[0] - start < 5
    assert [line["request_id"] for line in lines(stream)] == ["a0", "a1", "a2"]
