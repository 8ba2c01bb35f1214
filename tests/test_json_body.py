"""JSON bodies: bounded before parsing, priced as measured, the NaN fallback bounded."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from app.api.errors import ApiError
from app.api.json_body import (
    PARSED,
    REPARSE_BYTES,
    check_value_count,
    most_values,
    parse_json,
    parsed_bytes,
)
from app.spec import FeatureInput, TokenInput
from bench.parse_cost import held, infer_body, parse_infer, parse_v2, v2_body

TOKENS = TokenInput(np.zeros((1000, 4), np.float32))


def test_a_valid_body_never_holds_more_values_than_the_bound() -> None:
    """The largest valid bodies (each value, step and sequence separated by a comma) pass."""
    for model_input in (TOKENS, FeatureInput(1), FeatureInput(3)):
        most = most_values(4, 16, model_input)
        check_value_count(infer_body(model_input, 1, batch=4, steps=16), most)
        check_value_count(v2_body(1, batch=4, steps=16 * getattr(model_input, "features", 1)), most)
    assert most_values(64, 2048, TOKENS) == 64 * 2048 + 2 * 64 + 64
    assert most_values(64, 2048, FeatureInput(3)) == 64 * 2048 * 4 + 2 * 64 + 64


def test_a_body_past_the_bound_is_refused_unparsed() -> None:
    with pytest.raises(ApiError) as caught:
        check_value_count(b"[" + b"1," * 101 + b"1]", 100)
    assert caught.value.status == 413 and caught.value.type == "too_many_values"
    check_value_count(b"[" + b"1," * 100 + b"1]", 100)


def test_the_price_is_the_body_and_its_parsed_forms_bounded_by_the_values() -> None:
    tokens = PARSED["tokens"]
    assert parsed_bytes(1000, 10**6, tokens) == 1000 + tokens.per_body_byte * 1000
    assert parsed_bytes(4 << 20, 1000, tokens) == (4 << 20) + tokens.per_value * 1000


@pytest.mark.parametrize("case", ["token ids 300", "features, 1 per step", "v2 ids 300"])
def test_the_price_covers_what_parsing_holds(case: str) -> None:
    """Measured as bench/parse_cost.py does (tracemalloc's peak), on the shortest forms."""
    body, parse, model_input = {
        "token ids 300": (infer_body(TOKENS, 300), parse_infer, TOKENS),
        "features, 1 per step": (infer_body(FeatureInput(1), 1), parse_infer, FeatureInput(1)),
        "v2 ids 300": (v2_body(300), parse_v2, TOKENS)}[case]
    measured = held(body, parse, model_input)
    assert measured["per_value"] <= measured["priced_per_value"]
    assert measured["per_body_byte"] <= measured["priced_per_body_byte"]


def test_a_small_body_with_nan_is_read_again_for_the_place() -> None:
    data = parse_json(b'{"sequences": [[1, 2], [3, NaN, -Infinity], [1e999]]}')
    assert math.isnan(data["sequences"][1][1]) and data["sequences"][1][2] == -math.inf
    assert data["sequences"][2][0] == math.inf


@pytest.mark.parametrize("body", [
    b'{"sequences": [[1, 2], [3, 4]', b'{"sequences": [[NaN, 2]', b"[" + b" " * REPARSE_BYTES + b"NaN]"])
def test_broken_or_large_bodies_get_400_at_once(body: bytes) -> None:
    with pytest.raises(ApiError) as caught:
        parse_json(body)
    assert caught.value.status == 400 and "not valid JSON" in caught.value.message


def test_orjson_is_tried_first() -> None:
    assert parse_json(orjson.dumps({"a": [1, 2.5]})) == {"a": [1, 2.5]}
