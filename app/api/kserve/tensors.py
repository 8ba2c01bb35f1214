"""Tensors on the wire: the protocol's datatypes, JSON ``data``, and the binary tensor data
extension (a JSON header of ``Inference-Header-Content-Length`` bytes, then each binary tensor's
bytes in the order of the tensors, little-endian, row-major).

Every problem is a ``400`` naming the tensor; nothing here knows the served model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from app.api.dataplane import off_loop
from app.api.errors import ApiError

# Fixed-size datatypes, little-endian as the binary extension and raw gRPC contents define them.
# BYTES and BF16 have no use in this model's tensors.
DATATYPES: dict[str, np.dtype] = {name: np.dtype(code) for name, code in {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}.items()}


INFLATE_STEP = 1024 * 1024  # what the budget's share grows by as a body inflates


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_tensor", message)


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    array: np.ndarray  # shaped as the tensor

    @property
    def shape(self) -> list[int]:
        return list(self.array.shape)


def dtype_of(name: str, datatype: str) -> np.dtype:
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise invalid(f"tensor '{name}': datatype {datatype!r} is not supported here "
                      f"(one of {', '.join(DATATYPES)})") from None


def element_count(name: str, shape: list[int]) -> int:
    if any(dim < 0 for dim in shape):
        raise invalid(f"tensor '{name}': shape {shape} has a negative dimension")
    return math.prod(shape)


def tensor_from_bytes(name: str, datatype: str, shape: list[int], data: bytes | memoryview) -> Tensor:
    """A tensor from its binary form (the HTTP binary extension, or gRPC raw contents)."""
    dtype = dtype_of(name, datatype)
    expected = element_count(name, shape) * dtype.itemsize
    if len(data) != expected:
        raise invalid(f"tensor '{name}': {len(data)} bytes of data, but shape {shape} of "
                      f"{datatype} takes {expected}")
    return Tensor(name, datatype, np.frombuffer(data, dtype).reshape(shape))


def tensor_from_values(name: str, datatype: str, shape: list[int], values: Any) -> Tensor:
    """A tensor from its elements: JSON ``data`` (flat or nested row-major) or typed gRPC contents.

    Integer datatypes take integral numbers in their range (``2.0`` counts as 2, as in JSON)."""
    dtype = dtype_of(name, datatype)
    count = element_count(name, shape)
    flat = flatten(name, values)
    if len(flat) != count:
        raise invalid(f"tensor '{name}': {len(flat)} elements of data, but shape {shape} holds {count}")
    try:
        numbers = np.fromiter(flat, dtype=np.float64 if dtype.kind in "iu" else dtype, count=count)
    except (TypeError, ValueError, OverflowError):
        raise invalid(f"tensor '{name}': data holds values that are not {datatype}") from None
    if dtype.kind in "iu":
        limits = np.iinfo(dtype)
        exact = np.isfinite(numbers) & (numbers == np.floor(numbers))
        if not np.all(exact & (numbers >= limits.min) & (numbers <= limits.max)):
            raise invalid(f"tensor '{name}': data holds values that are not {datatype}")
    return Tensor(name, datatype, numbers.astype(dtype).reshape(shape))


def flatten(name: str, values: Any) -> list:
    if not isinstance(values, list):
        raise invalid(f"tensor '{name}': data must be an array")
    try:
        while values and isinstance(values[0], list):
            values = list(chain.from_iterable(values))
    except TypeError:
        raise invalid(f"tensor '{name}': data is not a row-major array of its shape") from None
    return values


def as_little_endian_bytes(array: np.ndarray) -> memoryview:
    """The binary form of an output tensor, without a copy when it already is one."""
    contiguous = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return memoryview(contiguous).cast("B")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tensor data after it (``Inference-Header-Content-Length``)."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        length = int(header_length)
    except ValueError:
        raise invalid(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
    if length == 0:
        raise invalid("Inference-Header-Content-Length 0 (a raw binary request without a JSON "
                      "header) is not supported: send the inference header")
    if not 0 < length <= len(body):
        raise invalid(f"Inference-Header-Content-Length {length} is outside the body's "
                      f"{len(body)} bytes")
    view = memoryview(body)
    return body[:length], view[length:]


def check_encoding(encoding: str | None) -> None:
    """415 for a Content-Encoding other than gzip, deflate or none."""
    if encoding not in (None, "", "identity", "gzip", "deflate"):
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported "
                       "(gzip, deflate or none)")


async def inflated(body: bytes, encoding: str | None, limit: int,
                   grow: Callable[[int], Awaitable[None]]) -> bytes:
    """A request body as sent with ``Content-Encoding: gzip | deflate`` (tritonclient's
    ``request_compression_algorithm``), inflated to at most ``limit`` bytes (else 413), in
    slices of ``INFLATE_STEP`` bytes on the parsing thread (zlib lets go of the interpreter
    lock meanwhile), ``grow(size)`` before each (the memory it will hold)."""
    if encoding in (None, "", "identity"):
        return body
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    pieces, size, pending = [], 0, body
    while True:
        await grow(min(size + INFLATE_STEP, limit + 1))
        try:
            piece = await off_loop(inflater.decompress, pending, INFLATE_STEP)
        except zlib.error as exc:
            raise invalid(f"the {encoding} body cannot be decompressed: {exc}") from None
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the decompressed body exceeds {limit} bytes")
        pending = inflater.unconsumed_tail
        if len(piece) < INFLATE_STEP and not pending:
            return await off_loop(b"".join, pieces)
