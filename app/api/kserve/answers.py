"""The v2 answers: what each holds (its price, for :mod:`app.api.dataplane`) and, over HTTP,
how it is sent part by part as the engine produces it, as ``/infer``'s is.

- **Every output binary**: the JSON header (each output's ``binary_data_size`` is known up
  front: ``batch x steps x width x 4``), then each tensor's raw bytes, row by row in sequence
  order (the row's values, then zeros up to ``steps``), in slices of ``CHUNK_BYTES``.
- **Every output JSON**: one chunked JSON document, each tensor's flat ``data`` encoded a few
  rows at a time.
- **Mixed**: the JSON header carries the JSON tensors' data and its length
  (``Inference-Header-Content-Length``) goes before it: the tensors are gathered part by part
  (padded float32), the header encoded, then the binary data sent from the gathered tensors.

When both outputs stream, ``hidden`` (128 times larger on the default model) goes first and
only the small ``outputs`` rows are kept for the end; a client finds tensors by name, and the
binary data follows the header's order. Over gRPC the answer is one message, built whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi.responses import Response

from app.api.dataplane import Admitted, Pricing, off_loop
from app.api.kserve.signature import HIDDEN, OUTPUTS, RESULT_INDEX, gathered_tensors
from app.api.kserve.tensors import Tensor, as_little_endian_bytes
from app.api.streaming import CHUNK_BYTES, JSONList, StreamedAnswer
from app.engine.runner import Result
from app.service.pricing import (
    FLOAT_BYTES,
    JSON_BYTES_PER_FLOAT,
    NOTHING_HELD,
    WHOLE_MESSAGE_BYTES_PER_FLOAT,
    Held,
)

DROP_HIDDEN = f"leave '{HIDDEN}' out of the requested outputs"
ZEROS = bytes(CHUNK_BYTES)  # the padding past a row's length, sent in slices of this


@dataclass(frozen=True)
class AnswerPlan:
    """The outputs of one v2 answer in the order they are sent, and how each is encoded."""

    names: list[str]
    binary: list[bool]
    batch: int
    steps: int
    widths: dict[str, int]

    @classmethod
    def over_http(cls, names: list[str], binary: list[bool], batch: int, steps: int,
                  widths: dict[str, int]) -> AnswerPlan:
        """Hidden first when both outputs stream (all binary or all JSON)."""
        plan = cls(names, binary, batch, steps, widths)
        if plan.streamed and names == [OUTPUTS, HIDDEN]:
            plan = cls([HIDDEN, OUTPUTS], binary[::-1], batch, steps, widths)
        return plan

    @property
    def streamed(self) -> bool:
        return all(self.binary) or not any(self.binary)

    def pricing(self, over_grpc: bool = False) -> Pricing:
        """What this answer holds, and what it would without the hidden states."""
        kept = [(name, binary) for name, binary in zip(self.names, self.binary) if name != HIDDEN]
        lighter = None
        if kept and len(kept) < len(self.names):
            plan = AnswerPlan([n for n, _ in kept], [b for _, b in kept], self.batch, self.steps, self.widths)
            lighter = plan.held(over_grpc)
        return Pricing(self.held(over_grpc), lighter, DROP_HIDDEN)

    def held(self, over_grpc: bool) -> Held:
        """Over gRPC, the whole message; over HTTP, streamed: the small output rows when they
        wait for the hidden states; mixed: every tensor gathered (float32), with the JSON
        ones' data encoded in the header."""
        if over_grpc:
            floats = sum(self.widths[name] for name in self.names)
            return Held(WHOLE_MESSAGE_BYTES_PER_FLOAT * floats, self.steps)
        if self.streamed:
            return Held(FLOAT_BYTES * self.widths[OUTPUTS]) if len(self.names) == 2 else NOTHING_HELD
        per_token = sum(self.widths[name] * (FLOAT_BYTES if binary else FLOAT_BYTES + JSON_BYTES_PER_FLOAT)
                        for name, binary in zip(self.names, self.binary))
        return Held(per_token, self.steps)

    def shape(self, name: str) -> list[int]:
        return [self.batch, self.steps, self.widths[name]]

    def size(self, name: str) -> int:
        """The bytes of the tensor ``name`` in binary form."""
        return FLOAT_BYTES * self.batch * self.steps * self.widths[name]

    @property
    def total_size(self) -> int:
        """The bytes of every tensor asked for, in binary form."""
        return sum(self.size(name) for name in self.names)


async def http_answer(plan: AnswerPlan, header: dict[str, Any], admitted: Admitted,
                      send_timeout_s: float) -> Response:
    """The answer for ``admitted`` (``header``: its model name, version and id), streamed;
    ``admitted`` is finished (the budget released) when it ends, however it ends."""
    if not any(plan.binary):
        return StreamedAnswer(json_document(plan, header, admitted.parts()), admitted.finish, send_timeout_s)
    if plan.streamed:
        outputs = [{"name": name, "datatype": "FP32", "shape": plan.shape(name),
                    "parameters": {"binary_data_size": plan.size(name)}} for name in plan.names]
        head = orjson.dumps({**header, "outputs": outputs})
        chunks = binary_data(plan, head, admitted.parts())
        length = len(head) + plan.total_size
    else:
        try:
            tensors = await gathered_tensors(admitted.parts(), plan.batch, plan.steps, plan.widths,
                                             plan.names)
        except BaseException:
            await admitted.finish()
            raise
        head, blobs = await off_loop(whole_answer, header, tensors, plan.binary)
        chunks, length = _sent(head, blobs), len(head) + sum(blob.nbytes for blob in blobs)
    return StreamedAnswer(chunks, admitted.finish, send_timeout_s, "application/octet-stream", {
        "Content-Length": str(length), "Inference-Header-Content-Length": str(len(head))})


async def _rows(plan: AnswerPlan,
                parts: AsyncIterator[list[Result]]) -> AsyncIterator[tuple[int, np.ndarray]]:
    """``(tensor index, row)`` in the order sent: the first tensor's rows as the parts come, in
    sequence order (each part's arrays dropped once sent), then the second's (``outputs``),
    kept meanwhile."""
    first, kept = RESULT_INDEX[plan.names[0]], []
    second = RESULT_INDEX[plan.names[-1]] if len(plan.names) == 2 else None
    count = 0
    async for results in parts:
        for result in results:
            if second is not None:
                kept.append(result[second])
            yield 0, result[first]
            count += 1
        del results
    if count != plan.batch:  # the parts are consecutive runs of the batch, returned in order
        raise RuntimeError(f"the parts held {count} rows for a batch of {plan.batch}")
    for row in kept:
        yield 1, row


async def binary_data(plan: AnswerPlan, header: bytes,
                       parts: AsyncIterator[list[Result]]) -> AsyncIterator[bytes | memoryview]:
    yield header
    async for _, row in _rows(plan, parts):
        for chunk in _row_bytes(row, plan.steps):
            yield chunk


def _row_bytes(row: np.ndarray, steps: int) -> Iterator[memoryview]:
    """One row of a ``[batch, steps, width]`` tensor: its values, then zeros up to ``steps``."""
    data = as_little_endian_bytes(row)
    for start in range(0, data.nbytes, CHUNK_BYTES):
        yield data[start:start + CHUNK_BYTES]
    padding = (steps - len(row)) * row.shape[1] * FLOAT_BYTES
    zeros = memoryview(ZEROS)
    for start in range(0, padding, CHUNK_BYTES):
        yield zeros[: min(CHUNK_BYTES, padding - start)]


async def json_document(plan: AnswerPlan, header: dict[str, Any],
                         parts: AsyncIterator[list[Result]]) -> AsyncIterator[bytes]:
    opening = orjson.dumps({**header, "outputs": []})[:-2]  # up to the outputs' "["
    data, current = None, -1
    async for index, row in _rows(plan, parts):
        if index != current:
            name = plan.names[index]
            described = orjson.dumps({"name": name, "datatype": "FP32", "shape": plan.shape(name)})[:-1]
            before = opening if data is None else data.close() + b"},"
            yield before + described + b',"data":'
            data, current = JSONList(flat=True), index
        for chunk in data.extend([row], plan.steps):
            yield chunk
    assert data is not None
    yield data.close() + b"}]}"


async def _sent(head: bytes, blobs: list[memoryview]) -> AsyncIterator[bytes | memoryview]:
    yield head
    for blob in blobs:
        for start in range(0, blob.nbytes, CHUNK_BYTES):
            yield blob[start:start + CHUNK_BYTES]


def whole_answer(header: dict[str, Any], tensors: list[Tensor],
                 binary_flags: list[bool]) -> tuple[bytes, list[memoryview]]:
    """The JSON header (JSON tensors' data in it) and the binary tensors' bytes (views)."""
    outputs, blobs = [], []
    for tensor, binary in zip(tensors, binary_flags):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary:
            blobs.append(as_little_endian_bytes(tensor.array))
            entry["parameters"] = {"binary_data_size": blobs[-1].nbytes}
        else:
            entry["data"] = tensor.array.ravel()
        outputs.append(entry)
    return orjson.dumps({**header, "outputs": outputs}, option=orjson.OPT_SERIALIZE_NUMPY), blobs
