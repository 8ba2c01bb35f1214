"""uvicorn's HTTP protocol (httptools) with a deadline for each request's headers.

uvicorn bounds the idle time between two requests of a connection (``timeout_keep_alive``)
but neither a new connection's wait for its first request nor the time a client takes to
send a request's headers: a client that connects and stalls, or sends half a request line,
would hold its connection for good. Here every request has ``HEADER_TIMEOUT_S`` to complete
its headers, counted from the connection's opening (the first request) or from the
request's first byte (the next ones). Past it, a client that sent part of a request gets
``408`` with the usual JSON error body; an idle connection is closed without a word (a 408
there could be taken as the answer to a request sent meanwhile). The body has its own
deadline (``BODY_TIMEOUT_S``, :mod:`app.api.middleware`).

``python -m app serve`` uses it; plain uvicorn needs
``uvicorn app.main:app --http app.api.transport:HeaderDeadlineProtocol``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.errors import error_body
from app.config import get_settings


class HeaderDeadlineProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = get_settings().header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._inside_headers = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._inside_headers = True
        self._start_header_clock()

    def on_headers_complete(self) -> None:
        self._inside_headers = False
        self._stop_header_clock()
        super().on_headers_complete()

    def _start_header_clock(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._start_header_clock()  # a pipelined request waits for the answer before it
            return
        if self._inside_headers:
            body = error_body(408, "header_timeout",
                              f"the request's headers did not arrive within {self.header_timeout_s:g} s")
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()
