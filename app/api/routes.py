"""HTTP routes: validate, delegate to the model service, serialise with orjson."""

from __future__ import annotations

from itertools import chain
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError

from app.api.errors import ApiError, summarize, validation_details
from app.api.schemas import ErrorResponse, InferResponse, make_infer_request
from app.config import Settings
from app.runtime.service import ModelService

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def get_service(request: Request) -> ModelService:
    return request.app.state.service


Service = Annotated[ModelService, Depends(get_service)]


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=JSON_OPTIONS), status_code=status,
                    headers=headers, media_type="application/json")


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter()
    infer_request = make_infer_request(settings.max_batch, settings.max_len)
    errors = {code: {"model": ErrorResponse} for code in (400, 413, 422, 503)}

    @router.post(
        "/infer", response_model=InferResponse, responses=errors,  # type: ignore[arg-type]
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": infer_request.model_json_schema()}}}},
        summary="Per-step outputs for unpadded, variable-length sequences",
    )
    async def infer(request: Request, service: Service) -> Response:
        if not service.status.ready:
            raise ApiError(503, "not_ready", f"model not ready ({service.status.stage})",
                           headers={"Retry-After": "1"})
        body = parse_body(await request.body(), infer_request)
        sequences = token_arrays(body.sequences, service.bundle.spec.vocab_size)  # type: ignore[attr-defined, union-attr]
        results = await service.infer(sequences)
        content: dict[str, Any] = {"model": service.bundle.spec.name,  # type: ignore[union-attr]
                                   "outputs": [outputs for outputs, _ in results]}
        if body.return_hidden:  # type: ignore[attr-defined]
            content["hidden"] = [hidden for _, hidden in results]
        return json_response(content)

    @router.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @router.get("/readyz", summary="Readiness: loaded, converted, self-checked and warm",
                responses={503: {"description": "not ready yet, or failed"}})
    async def readyz(service: Service) -> Response:
        status = service.status
        body = {"ready": status.ready, "stage": status.stage, "error": status.error}
        return json_response(body, 200 if status.ready else 503)

    @router.get("/v1/model", summary="What is served: source, conversion, architecture, self-check")
    async def model_info(service: Service) -> Response:
        return json_response(service.metadata())

    @router.get("/v1/model/vocabulary", summary="Token strings by id, when the model ships them",
                responses={404: {"model": ErrorResponse}})
    async def vocabulary(service: Service) -> Response:
        tokens = service.bundle.vocabulary if service.bundle else None
        if tokens is None:
            raise ApiError(404, "no_vocabulary", "this model ships no vocabulary")
        return json_response({"tokens": tokens})

    return router


def parse_body(raw: bytes, model: type[BaseModel]) -> BaseModel:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details = validation_details(exc)
        raise ApiError(422, "invalid_request", summarize(details), details) from None


def token_arrays(sequences: list[list[int]], vocab_size: int) -> list[np.ndarray]:
    """One int32 array per sequence, after checking every id is in ``[0, vocab_size)``."""
    lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
    try:
        flat = np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=int(lengths.sum()))
    except OverflowError:
        raise ApiError(422, "invalid_token", f"token ids must be in [0, {vocab_size})") from None
    bad = np.flatnonzero((flat < 0) | (flat >= vocab_size))
    if bad.size:
        offsets = np.cumsum(lengths)
        row = int(np.searchsorted(offsets, bad[0], side="right"))
        column = int(bad[0] - (offsets[row - 1] if row else 0))
        raise ApiError(
            422, "invalid_token",
            f"sequences.{row}.{column}: token id {int(flat[bad[0]])} is outside [0, {vocab_size})"
            + (f" (and {bad.size - 1} more)" if bad.size > 1 else ""),
        )
    return np.split(flat.astype(np.int32), np.cumsum(lengths)[:-1])


def include_routes(app: FastAPI, settings: Settings) -> None:
    app.include_router(build_router(settings))
