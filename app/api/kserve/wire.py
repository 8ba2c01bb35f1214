"""The Open Inference Protocol's v2 REST request and error bodies, as pydantic models."""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

Parameter = StrictBool | StrictInt | StrictFloat | StrictStr


class RequestInput(BaseModel):
    name: StrictStr
    shape: list[NonNegativeInt]
    datatype: StrictStr
    parameters: dict[str, Parameter] = {}
    data: Any = None  # checked against shape and datatype by tensors.tensor_from_values


class RequestOutput(BaseModel):
    name: StrictStr
    parameters: dict[str, Parameter] = {}


class InferenceRequest(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": [
        {"name": "ids", "datatype": "INT32", "shape": [2, 4], "data": [41, 74, 71, 81, 8, 15, 0, 0]},
        {"name": "lengths", "datatype": "INT32", "shape": [2], "data": [4, 2]}]}]})

    id: StrictStr | None = None
    parameters: dict[str, Parameter] = {}
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ProtocolError(BaseModel):
    error: str


class RepositoryIndexRequest(BaseModel):
    ready: StrictBool = False  # only the versions ready for inference


class RepositoryControlRequest(BaseModel):
    """A load's or an unload's body (both optional, as the body itself is)."""

    parameters: dict[str, Parameter] = {}
