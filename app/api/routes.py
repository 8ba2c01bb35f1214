"""HTTP routes: validate, delegate to the model service, serialise with orjson."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from app.api.dataplane import (
    BodyHold,
    Pricing,
    Service,
    admit_and_start,
    check_ready,
    off_loop,
    read_body,
)
from app.api.errors import ApiError
from app.api.inputs import InvalidInput, input_arrays
from app.api.json_body import PARSED, check_value_count, most_values, parse_body, parsed_bytes
from app.api.openapi import publish_model_schema
from app.api.schemas import ErrorResponse, InferResponse, make_infer_request
from app.api.streaming import StreamedAnswer, infer_document
from app.config import Settings
from app.observability import Metrics
from app.service.model_service import ModelService
from app.spec import ModelInput


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def json_response(content: Any, status: int = 200) -> Response:
    """Plain data (answers carrying arrays are streamed: app.api.streaming)."""
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def include_routes(app: FastAPI, settings: Settings) -> None:
    app.include_router(build_router(settings))
    publish_model_schema(app, settings)


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter()
    request_models = {kind: make_infer_request(settings.max_batch, settings.max_len, kind)
                      for kind in ("tokens", "features")}
    infer_request = request_models["tokens"]  # the published schema follows the loaded model
    errors = {code: {"model": ErrorResponse} for code in (400, 413, 422, 503, 504)}

    @router.post(
        "/infer", response_model=InferResponse, responses=errors,  # type: ignore[arg-type]
        openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": infer_request.model_json_schema()}}}},
        summary="Per-step outputs for unpadded, variable-length sequences",
    )
    async def infer(request: Request, service: Service, metrics: MetricsDep) -> Response:
        check_ready(service)
        model_input = service.model_input
        most, cost = most_values(settings.max_batch, settings.max_len, model_input), PARSED[model_input.kind]
        async with BodyHold(service, settings.request_timeout_s, metrics) as hold:
            raw = await read_body(request, hold, lambda size: parsed_bytes(size, most, cost),
                                  settings.max_body_bytes)
            body_bytes = len(raw)
            sequences, return_hidden = await off_loop(
                parsed_inputs, raw, request_models[model_input.kind], most, model_input)
            del raw  # the input arrays are all that is kept
        return await answer_streamed(service, sequences, return_hidden, body_bytes, settings, metrics)

    @router.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @router.get("/readyz", summary="Readiness: loaded, converted, self-checked and warm",
                responses={503: {"description": "not ready yet, or failed"}})
    async def readyz(service: Service) -> Response:
        status = service.status
        body = {"ready": status.ready, "stage": status.stage, "detail": status.detail, "error": status.error}
        return json_response(body, 200 if status.ready else 503)

    @router.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(metrics: MetricsDep) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

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


async def answer_streamed(service: ModelService, sequences: list[np.ndarray], return_hidden: bool,
                          body_bytes: int, settings: Settings, metrics: Metrics) -> Response:
    """Admit the request (:func:`~app.api.dataplane.admit_and_start`), run it part by part and
    stream the document. A one-part answer without hidden states goes out in one piece."""
    costs = service.costs
    assert costs is not None
    pricing = Pricing(costs.kept_outputs(return_hidden),
                      costs.kept_outputs(False) if return_hidden else None, "drop return_hidden")
    admitted = await admit_and_start(service, sequences, pricing, body_bytes,
                                     settings.request_timeout_s, metrics)
    del sequences
    document = infer_document(service.bundle.spec.name, admitted.parts(),  # type: ignore[union-attr]
                              return_hidden)
    if admitted.count > 1 or return_hidden:
        return StreamedAnswer(document, admitted.finish, settings.send_timeout_s)
    try:
        return Response(b"".join([chunk async for chunk in document]), media_type="application/json")
    finally:
        await admitted.finish()


def parsed_inputs(raw: bytes, model: type[BaseModel], most: int,
                  model_input: ModelInput) -> tuple[list[np.ndarray], bool]:
    """The body's input arrays and ``return_hidden``; its parsed forms are gone on return."""
    check_value_count(raw, most)
    body = parse_body(raw, model)
    try:
        return input_arrays(body.sequences, model_input), body.return_hidden  # type: ignore[attr-defined]
    except InvalidInput as exc:
        raise ApiError(422, exc.kind, exc.message) from None
