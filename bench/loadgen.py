"""A minimal keep-alive HTTP/1.1 client on asyncio streams, for loopback load.

The benchmark's client shares the machine's two cores with the service, so it must cost
as little CPU as possible: requests are encoded up front and responses parsed just enough
to get the status and drain the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Iterator


@contextlib.contextmanager
def client_collector_quiet() -> Iterator[None]:
    """Timings from a Python client in this process without its own collector's pauses: what
    the process holds so far is frozen (a full collection walked the benchmark's heap,
    TensorFlow's included, for about 10 ms, and once fell on a timed request), then let go."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, f"{host}:{port}")

    def encode_post(self, path: str, body: bytes) -> bytes:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        return head.encode() + body

    async def send(self, request: bytes, timeout: float = 30) -> tuple[float, int, bytes]:
        """Send one encoded request; returns (seconds, status, body)."""
        start = time.perf_counter()
        self.writer.write(request)
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        status = int(head[9:12])
        length, chunked = 0, False
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
            elif line.lower() == b"transfer-encoding: chunked":
                chunked = True
        read = self._read_chunked() if chunked else self.reader.readexactly(length)
        body = await asyncio.wait_for(read, timeout)
        return time.perf_counter() - start, status, body

    async def _read_chunked(self) -> bytes:
        """A chunked body (large /infer answers are streamed), joined."""
        chunks = []
        while size := int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
            chunks.append(await self.reader.readexactly(size + 2))
            chunks[-1] = chunks[-1][:-2]
        await self.reader.readuntil(b"\r\n")  # no trailers: the empty line after the last chunk
        return b"".join(chunks)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()
