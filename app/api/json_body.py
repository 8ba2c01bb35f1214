"""JSON request bodies: parsed with orjson, validated by a pydantic model, bounded before
either runs.

A body that holds more values than any valid request can (:func:`check_value_count`, by its
commas: one C pass over the bytes) is refused before it is parsed, so that parsing and
validating, which hold the interpreter lock in one C call each, never take longer than the
largest valid request takes. What a parsed body holds in memory is priced by
:func:`parsed_bytes` (measured with ``bench/parse_cost.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ValidationError

from app.api.errors import ApiError, summarize, validation_details
from app.spec import FeatureInput, ModelInput

NON_FINITE = (b"NaN", b"Infinity")
# Largest body read again to find a non-finite number's place: the standard library holds the
# interpreter lock for the whole parse, which the event loop then waits out.
REPARSE_BYTES = 512 * 1024


@dataclass(frozen=True)
class ParsedCost:
    """What the parsed forms of a body hold (orjson's objects, pydantic's validated copy, the
    input arrays), per byte of the body and per value or array in it; covers the peaks
    measured on the largest valid bodies in their shortest forms (bench/parse_cost.py)."""

    per_body_byte: int
    per_value: int


PARSED = {"tokens": ParsedCost(per_body_byte=24, per_value=96),
          "features": ParsedCost(per_body_byte=48, per_value=192)}


def most_values(max_batch: int, max_len: int, model_input: ModelInput) -> int:
    """The most values and arrays a valid body holds (``/infer``'s or a v2 tensor's, nested
    or flat, with its lengths and a little JSON around them)."""
    width = model_input.features if isinstance(model_input, FeatureInput) else 0
    return max_batch * max_len * (width + 1) + 2 * max_batch + 64


def parsed_bytes(body_bytes: int, most_values: int, cost: ParsedCost) -> int:
    """What a body of ``body_bytes`` holds once read and parsed: itself, and its parsed forms
    (of at most ``most_values`` values: more are refused unparsed)."""
    return body_bytes + min(cost.per_body_byte * body_bytes, cost.per_value * most_values)


def check_value_count(raw: bytes, most_values: int) -> None:
    """413 when ``raw`` holds more values than ``most_values`` (a valid body's commas separate
    its values and arrays: there are fewer of them than its values and arrays)."""
    commas = raw.count(b",")
    if commas > most_values:
        raise ApiError(413, "too_many_values", f"the body holds over {most_values} values, more "
                       "than the largest request this deployment takes (MAX_BATCH x MAX_LEN)")


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    data = parse_json(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = validation_details(exc)
        raise ApiError(422, "invalid_request", summarize(details), details) from None


def parse_json(raw: bytes) -> Any:
    """orjson; a body of up to ``REPARSE_BYTES`` it refuses at a ``NaN``, ``Infinity`` or an
    overflowing number is read again by the standard library, so that validation can say
    where that number is (a 422 naming the place, not a 400 for the whole body). Any other
    error, or a larger body, gets the 400 at once (orjson's message gives the position)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # Its text and place only: the error itself holds this frame (and the body) in a cycle.
        error, position, reason = str(exc), exc.pos, exc.msg
    non_finite_here = raw.startswith(NON_FINITE, position) or "infinity when parsed" in reason
    if not non_finite_here or len(raw) > REPARSE_BYTES:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {error}") from None
    non_finite: list[float] = []

    def number(text: str) -> float:
        value = float(text)
        if not np.isfinite(value):
            non_finite.append(value)
        return value

    try:
        data = json.loads(raw, parse_float=number, parse_constant=number)
    except (ValueError, RecursionError):
        non_finite.clear()  # broken anyway: the parse error is the answer
    if not non_finite:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {error}") from None
    return data
