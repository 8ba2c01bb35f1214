"""What a parsed request body holds: the peak of Python's allocations (tracemalloc: orjson's
objects, pydantic's validated copy, the input arrays) while ``/infer`` and the v2 REST route
parse the largest valid bodies in their shortest forms, per value or array of the body (its
commas + 1) and per byte of it: what ``app.api.json_body.PARSED`` must cover.

    python -m bench.parse_cost
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable

import numpy as np
import orjson

from app.api.inputs import input_arrays
from app.api.json_body import PARSED, parse_body
from app.api.kserve.rest import read_inputs
from app.api.kserve.signature import sequences_from
from app.api.kserve.wire import InferenceRequest
from app.api.schemas import make_infer_request
from app.spec import FeatureInput, ModelInput, TokenInput

BATCH, STEPS = 64, 2048


def infer_body(model_input: ModelInput, value: float, batch: int = BATCH, steps: int = STEPS) -> bytes:
    width = getattr(model_input, "features", None)
    step = value if width is None else [value] * width
    return orjson.dumps({"sequences": [[step] * steps] * batch})


def v2_body(value: int, batch: int = BATCH, steps: int = STEPS) -> bytes:
    return orjson.dumps({"inputs": [{"name": "ids", "datatype": "INT32", "shape": [batch, steps],
                                     "data": [value] * (batch * steps)}]})


def parse_infer(raw: bytes, model_input: ModelInput) -> object:
    request = parse_body(raw, make_infer_request(BATCH, STEPS, model_input.kind))
    return input_arrays(request.sequences, model_input)  # type: ignore[attr-defined]


def parse_v2(raw: bytes, model_input: ModelInput) -> object:
    request = parse_body(raw, InferenceRequest)
    return sequences_from(read_inputs(request.inputs, memoryview(b"")),  # type: ignore[attr-defined]
                          model_input, BATCH, STEPS)


def held(raw: bytes, parse: Callable[[bytes, ModelInput], object], model_input: ModelInput) -> dict:
    """The peak per value (or array) of the body, and per byte of it."""
    parse(raw, model_input)  # warm: pydantic's and numpy's caches are not the body's
    tracemalloc.start()
    kept = parse(raw, model_input)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del kept
    return {"per_value": round(peak / (raw.count(b",") + 1), 1), "per_body_byte": round(peak / len(raw), 1),
            "priced_per_value": PARSED[model_input.kind].per_value,
            "priced_per_body_byte": PARSED[model_input.kind].per_body_byte}


def main() -> None:
    tokens = TokenInput(np.zeros((1000, 4), np.float32))
    cases = {
        "/infer token ids 1 (the shortest)": (infer_body(tokens, 1), parse_infer, tokens),
        "/infer token ids 300 (not a cached small int)": (infer_body(tokens, 300), parse_infer, tokens),
        "/infer features 1, 1 per step": (infer_body(FeatureInput(1), 1), parse_infer, FeatureInput(1)),
        "/infer features 1, 2 per step": (infer_body(FeatureInput(2), 1), parse_infer, FeatureInput(2)),
        "/infer features 0.5, 8 per step": (infer_body(FeatureInput(8), 0.5), parse_infer, FeatureInput(8)),
        "v2 JSON ids 1": (v2_body(1), parse_v2, tokens),
        "v2 JSON ids 300": (v2_body(300), parse_v2, tokens),
    }
    print(json.dumps({name: held(*case) for name, case in cases.items()}, indent=2))


if __name__ == "__main__":
    main()
