"""Request and response shapes of the HTTP API."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, WithJsonSchema

# JSON Schema's "integer" includes 2.0, so integral floats are accepted; the range and
# integrality are checked on the whole batch at once in app.api.inputs.token_arrays, and
# the upper bound (vocab_size) joins the published schema once the model is loaded.
Token = Annotated[StrictInt | StrictFloat, WithJsonSchema({"type": "integer", "minimum": 0})]
# A JSON number (an integer counts), finite; the width joins the published schema at load.
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Step = Annotated[list[Feature], Field(min_length=1)]

EXAMPLES = {"tokens": {"sequences": [[41, 74, 71, 81], [8, 15]]},
            "features": {"sequences": [[[0.1, -0.4, 1.0], [0.0, 0.3, 0.2]], [[1.5, 0.0, -2.0]]]}}
DESCRIPTIONS = {
    "tokens": "token ids of each sequence, unpadded; each id in [0, vocab_size)",
    "features": "per sequence, one list of `features` finite numbers per step, unpadded",
}


def make_infer_request(max_batch: int, max_len: int, kind: str = "tokens") -> type[BaseModel]:
    """The ``POST /infer`` body for a model taking ``kind`` ("tokens" or "features"), with
    this deployment's limits in its schema."""
    step: Any = Token if kind == "tokens" else Step
    sequence = Annotated[list[step], Field(min_length=1, max_length=max_len)]

    class InferRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLES[kind]]})

        sequences: Annotated[list[sequence], Field(  # type: ignore[valid-type]
            min_length=1, max_length=max_batch, description=DESCRIPTIONS[kind])]
        return_hidden: StrictBool = Field(
            False, description="also return the last recurrent (GRU or LSTM) layer's per-step merged states")

    return InferRequest


class InferResponse(BaseModel):
    model: str
    outputs: list[list[list[float]]] = Field(
        description="per sequence, one row per token: the model's final per-step output")
    hidden: list[list[list[float]]] | None = None


class ErrorBody(BaseModel):
    status: int
    type: str
    message: str
    details: list[dict] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
