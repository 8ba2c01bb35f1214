"""Request and response shapes of the HTTP API."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, WithJsonSchema


def make_infer_request(max_batch: int, max_len: int) -> type[BaseModel]:
    """The ``POST /infer`` body, with this deployment's limits in its schema."""
    # JSON Schema's "integer" includes 2.0, so integral floats are accepted; the range and
    # integrality are checked on the whole batch at once in app.api.routes.token_arrays, and
    # the upper bound (vocab_size) joins the published schema once the model is loaded.
    token = Annotated[StrictInt | StrictFloat, WithJsonSchema({"type": "integer", "minimum": 0})]
    sequence = Annotated[list[token], Field(min_length=1, max_length=max_len)]

    class InferRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"sequences": [[41, 74, 71, 81], [8, 15]]}]},
        )

        sequences: Annotated[list[sequence], Field(
            min_length=1, max_length=max_batch,
            description="token ids of each sequence, unpadded; each id in [0, vocab_size)",
        )]
        return_hidden: StrictBool = Field(
            False, description="also return the last GRU layer's per-step merged states")

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
