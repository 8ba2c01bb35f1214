"""``/infer``'s answer as one JSON document, encoded and sent piece by piece.

The document is ``{"model": ..., "outputs": [...], "hidden": [...]}`` as always, but with
``return_hidden`` the ``hidden`` member comes before ``outputs`` (JSON objects carry no
order): the hidden states, 128 times the size of the outputs on the default model, are then
sent part by part as the engine produces them and released once sent, while the small
output rows are kept for the end. Without ``return_hidden`` the outputs stream the same way.
Chunks are about ``CHUNK_BYTES`` (a few rows of a sequence, or several short sequences).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator

import numpy as np
import orjson
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from app.engine.runner import Result
from app.service.pricing import JSON_BYTES_PER_FLOAT

CHUNK_BYTES = 64 * 1024


async def infer_document(model: str, parts: AsyncIterator[list[Result]],
                         return_hidden: bool) -> AsyncIterator[bytes]:
    """The chunks of the document for ``parts`` (each part's results, in sequence order)."""
    kept_outputs: list[np.ndarray] = []
    streamed = JSONList()
    yield b'{"model":' + orjson.dumps(model) + (b',"hidden":' if return_hidden else b',"outputs":')
    async for results in parts:
        if return_hidden:
            kept_outputs += [outputs for outputs, _ in results]
        for chunk in streamed.extend(row[1] if return_hidden else row[0] for row in results):
            yield chunk
        del results  # this part's arrays go as soon as they are sent
    if not return_hidden:
        yield streamed.close() + b"}"
        return
    yield streamed.close() + b',"outputs":'
    outputs = JSONList()
    for chunk in outputs.extend(kept_outputs):
        yield chunk
    yield outputs.close() + b"}"


class JSONList:
    """A JSON array of 2-D arrays, encoded a few rows at a time and handed out in chunks of
    about ``CHUNK_BYTES``: small buffers, reused by the allocator, never a whole answer.

    Nested (``[[row, ...], ...]``, ``/infer``'s form), or ``flat``: every value in row-major
    order, each array followed by zero rows up to ``steps`` when given (the Open Inference
    Protocol's ``data`` of a ``[batch, steps, width]`` tensor)."""

    def __init__(self, flat: bool = False) -> None:
        self.pending = bytearray(b"[")
        self.empty = True  # nothing yet at the current level: no comma before the next item
        self.flat = flat

    def extend(self, arrays: Iterable[np.ndarray], steps: int | None = None) -> Iterator[bytes]:
        for array in arrays:
            if self.flat:
                yield from self._values(array, steps)
                continue
            self.pending += b"[" if self.empty else b",["
            self.empty = True
            yield from self._values(array, None)
            self.pending += b"]"
            self.empty = False

    def _values(self, array: np.ndarray, steps: int | None) -> Iterator[bytes]:
        width = max(array.shape[1], 1)
        rows = max(1, CHUNK_BYTES // (JSON_BYTES_PER_FLOAT * width))
        for start in range(0, len(array), rows):
            block = array[start:start + rows]
            encoded = orjson.dumps(block.ravel() if self.flat else block, option=orjson.OPT_SERIALIZE_NUMPY)
            yield from self._append(memoryview(encoded)[1:-1])  # without the outer brackets
        zeros = (steps - len(array)) * array.shape[1] if steps else 0
        for start in range(0, zeros, rows * width):
            yield from self._append(b",".join([b"0.0"] * min(rows * width, zeros - start)))

    def _append(self, encoded: bytes | memoryview) -> Iterator[bytes]:
        if not self.empty:
            self.pending += b","
        self.pending += encoded
        self.empty = False
        if len(self.pending) >= CHUNK_BYTES:
            yield bytes(self.pending)
            self.pending = bytearray()

    def close(self) -> bytes:
        self.pending += b"]"
        return bytes(self.pending)


class ClientStalled(Exception):
    """The client took none of the answer for ``send_timeout_s``."""


class StreamedAnswer(StreamingResponse):
    """A streamed answer (``application/json`` unless told) that always runs ``on_close``
    (which releases what the request holds), whether the answer completed, failed, the client
    left, or the client stopped reading for ``send_timeout_s`` (:class:`ClientStalled`: the
    connection is then closed, see :mod:`app.api.middleware`)."""

    def __init__(self, chunks: AsyncIterator[bytes | memoryview], on_close: Callable[[], Awaitable[None]],
                 send_timeout_s: float, media_type: str = "application/json",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(chunks, media_type=media_type, headers=headers)
        self.on_close = on_close
        self.send_timeout_s = send_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_in_time(message: Message) -> None:
            try:
                await asyncio.wait_for(send(message), self.send_timeout_s)
            except TimeoutError:
                raise ClientStalled from None

        try:
            await super().__call__(scope, receive, send_in_time)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await self.on_close()
