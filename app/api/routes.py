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
    Models,
    Pricing,
    admit_and_start,
    parsed,
    read_body,
    served,
)
from app.api.errors import ApiError, api_error_response
from app.api.inputs import InvalidInput, input_arrays
from app.api.json_body import PARSED, check_value_count, most_values, parse_body, parsed_bytes
from app.api.openapi import publish_model_schema
from app.api.plain_routes import PlainRoute, plain_routes
from app.api.schemas import ErrorResponse, InferResponse, make_infer_request
from app.api.streaming import StreamedAnswer, infer_document
from app.config import Settings
from app.observability import Metrics
from app.service.model_service import Lease, ModelService
from app.service.repository import NotReady, Repository, UnknownModel
from app.spec import ModelInput


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def json_response(content: Any, status: int = 200) -> Response:
    """Plain data (answers carrying arrays are streamed: app.api.streaming)."""
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def include_routes(app: FastAPI, settings: Settings) -> list[PlainRoute]:
    """The routes, declared to FastAPI; returns the inference routes, to be answered in plain
    ASGI (:mod:`app.api.plain_routes`)."""
    router, plain = build_router(settings)
    app.include_router(router)
    publish_model_schema(app, settings)
    return plain


def build_router(settings: Settings) -> tuple[APIRouter, list[PlainRoute]]:
    router = APIRouter()
    request_models = {kind: make_infer_request(settings.max_batch, settings.max_len, kind)
                      for kind in ("tokens", "features")}
    infer_request = request_models["tokens"]  # the published schema follows the loaded model
    errors = {code: {"model": ErrorResponse} for code in (400, 413, 422, 503, 504)}

    infer_route = {
        "response_model": InferResponse, "responses": errors,
        "openapi_extra": {"requestBody": {"required": True, "content": {
            "application/json": {"schema": infer_request.model_json_schema()}}}}}

    async def infer_with(service: ModelService, request: Request, metrics: Metrics) -> Response:
        request.state.model = service.labels  # the access log names the model and version
        with service.lease() as lease:
            model_input = service.model_input
            most = most_values(settings.max_batch, settings.max_len, model_input)
            cost = PARSED[model_input.kind]
            async with BodyHold(service.budget, settings.request_timeout_s, metrics) as hold:
                raw = await read_body(request, hold, lambda size: parsed_bytes(size, most, cost),
                                      settings.max_body_bytes)
                body_bytes = len(raw)
                sequences, return_hidden = await parsed(
                    parsed_inputs, body_bytes, raw, request_models[model_input.kind], most, model_input)
                del raw  # the input arrays are all that is kept
            return await answer_streamed(lease, sequences, return_hidden, body_bytes, settings, metrics)

    async def plain_infer(request: Request, name: str | None = None, version: str | None = None) -> Response:
        state = request.app.state
        return await infer_with(served(state.repository, name, version), request, state.metrics)

    @router.post("/infer", summary="Per-step outputs for unpadded, variable-length sequences "
                 "(the default model)", **infer_route)  # type: ignore[arg-type]
    async def infer(request: Request, models: Models, metrics: MetricsDep) -> Response:
        return await infer_with(served(models, None), request, metrics)

    @router.post("/v1/models/{name}/infer", summary="Per-step outputs of model `name` (its serving "
                 "version: the highest ready)", **infer_route)  # type: ignore[arg-type]
    @router.post("/v1/models/{name}/versions/{version}/infer", summary="Per-step outputs of one "
                 "version of model `name`", **infer_route)  # type: ignore[arg-type]
    async def infer_model(request: Request, models: Models, metrics: MetricsDep, name: str,
                          version: str | None = None) -> Response:
        return await infer_with(served(models, name, version), request, metrics)

    @router.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @router.get("/readyz", summary="Readiness: loaded, converted, self-checked and warm",
                responses={503: {"description": "not ready yet, or failed"}})
    async def readyz(models: Models) -> Response:
        body = models.probe()
        return json_response(body, 200 if body["ready"] else 503)

    @router.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(metrics: MetricsDep) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/model", summary="The default model: source, conversion, architecture, self-check")
    async def model_info(models: Models) -> Response:
        return json_response(described(models, models.default_name()).metadata())

    @router.get("/v1/model/vocabulary", summary="Token strings by id, when the model ships them",
                responses={404: {"model": ErrorResponse}})
    async def vocabulary(models: Models) -> Response:
        service = described(models, models.default_name())
        tokens = service.bundle.vocabulary if service.bundle else None
        if tokens is None:
            raise ApiError(404, "no_vocabulary", "this model ships no vocabulary")
        return json_response({"tokens": tokens})

    @router.get("/v1/models", summary="Every model and version, with its state (LOADING, READY, "
                "UNLOADING, UNAVAILABLE) and why when it is not ready")
    async def list_models(models: Models) -> Response:
        return json_response({"models": models_index(models)})

    @router.get("/v1/models/{name}", summary="Model `name` as /v1/model describes the default one",
                responses={404: {"model": ErrorResponse}})
    @router.get("/v1/models/{name}/versions/{version}", summary="One version of model `name`",
                responses={404: {"model": ErrorResponse}})
    async def model_version_info(models: Models, name: str, version: str | None = None) -> Response:
        return json_response(described(models, name, version).metadata())

    plain = plain_routes(router.routes, ("/infer", "/v1/models/{name}/infer",
                                         "/v1/models/{name}/versions/{version}/infer"),
                         plain_infer, api_error_response)
    return router, plain


def described(models: Repository, name: str | None, version: str | None = None) -> ModelService:
    """The version to describe: the serving one, else the newest being loaded or failed."""
    if name is None:
        served(models, None)  # raises the 400 naming the routes
    try:
        return models.described(name or "", version)
    except UnknownModel as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    except NotReady as exc:
        raise ApiError(503, "not_ready", str(exc), headers={"Retry-After": "1"}) from None


def models_index(models: Repository) -> list[dict]:
    """``/v1/models``: each model with its versions (numbers), oldest first."""
    listed: dict[str, list[dict]] = {}
    for entry in models.index():
        version = {"version": int(entry["version"]), "state": entry["state"]}
        listed.setdefault(entry["name"], []).append(version | ({"reason": entry["reason"]}
                                                               if "reason" in entry else {}))
    return [{"name": name, "versions": versions} for name, versions in listed.items()]


async def answer_streamed(lease: Lease, sequences: list[np.ndarray], return_hidden: bool,
                          body_bytes: int, settings: Settings, metrics: Metrics) -> Response:
    """Admit the request (:func:`~app.api.dataplane.admit_and_start`), run it part by part and
    stream the document. A one-part answer without hidden states goes out in one piece."""
    service = lease.service
    costs = service.costs
    assert costs is not None
    pricing = Pricing(costs.kept_outputs(return_hidden),
                      costs.kept_outputs(False) if return_hidden else None, "drop return_hidden")
    admitted = await admit_and_start(lease, sequences, pricing, body_bytes,
                                     settings.request_timeout_s, metrics)
    del sequences
    document = infer_document(service.name, admitted.parts(), return_hidden)
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
