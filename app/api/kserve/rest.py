"""The Open Inference Protocol's HTTP routes under ``/v2``: validate, delegate to the same
service, limits, memory admission and batcher as ``/infer`` (a body priced before it is read,
a compressed one as it inflates, and parsed off the event loop: :mod:`app.api.dataplane`), and
answer in the protocol's JSON or with the binary tensor data extension, streamed
(:mod:`.answers`). Errors leave as the protocol's ``{"error": "message"}`` (with
``Retry-After`` on 503)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute

from app import __version__
from app.api.dataplane import BodyHold, Models, parsed, read_body, served
from app.api.errors import ApiError, protocol_error_response
from app.api.json_body import PARSED, check_value_count, most_values, parse_body, parsed_bytes
from app.api.kserve import PREFIX, SERVER_NAME, served_extensions
from app.api.kserve.answers import http_answer
from app.api.kserve.inference import Decoded, admitted, decoded
from app.api.kserve.signature import OUTPUT_NAMES, check_output_names, model_metadata
from app.api.kserve.tensors import (
    Tensor,
    check_encoding,
    inflated,
    invalid,
    split_body,
    tensor_from_bytes,
    tensor_from_values,
)
from app.api.kserve.wire import InferenceRequest, ProtocolError, RequestInput
from app.api.plain_routes import PlainRoute, plain_routes
from app.api.routes import json_response
from app.config import Settings
from app.service.model_service import Lease
from app.service.repository import Repository
from app.spec import ModelInput


def protocol_refusal(exc: ApiError, request: Request | None = None) -> Response:
    """An :class:`ApiError` in the protocol's form. The protocol has no 422: a request that is
    not what the model takes is a 400."""
    return protocol_error_response(400 if exc.status == 422 else exc.status, exc.message, exc.headers)


class ProtocolRoute(APIRoute):
    """A route whose errors leave in the protocol's form (:func:`protocol_refusal`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as exc:
                return protocol_refusal(exc)

        return handle


def include_kserve_routes(app: FastAPI, settings: Settings) -> list[PlainRoute]:
    """The routes under ``/v2``, declared to FastAPI; returns the inference routes, to be
    answered in plain ASGI (:mod:`app.api.plain_routes`)."""
    router, plain = build_kserve_router(settings)
    app.include_router(router)
    return plain


def build_kserve_router(settings: Settings) -> tuple[APIRouter, list[PlainRoute]]:
    router = APIRouter(prefix=PREFIX, route_class=ProtocolRoute, tags=["Open Inference Protocol (KServe v2)"])
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ProtocolError}
                                               for code in (400, 404, 413, 415, 503, 504)}
    health = {"response_class": Response, "responses": {400: {"description": "not ready (empty body)"}}}

    @router.get("", summary="Server metadata: name, version, extensions")
    async def server_metadata() -> Response:
        return json_response({"name": SERVER_NAME, "version": __version__,
                              "extensions": served_extensions(settings.repository_api)})

    @router.get("/health/live", summary="Server live: 200 while the process is up", response_class=Response)
    async def server_live() -> Response:
        return Response(status_code=200)

    @router.get("/health/ready", summary="Server ready: 200 once the models are ready, else 400", **health)
    async def server_ready(models: Models) -> Response:
        return Response(status_code=200 if models.ready else 400)

    @router.get("/models/{name}", summary="Model metadata: input and output tensors", responses=errors)
    @router.get("/models/{name}/versions/{version}", summary="Model metadata", responses=errors)
    async def metadata(models: Models, name: str, version: str = "") -> Response:
        return json_response(model_metadata(served(models, name, version), models.ready_versions(name)))

    ready_responses = {**errors, 400: health["responses"][400]}

    @router.get("/models/{name}/ready", summary="Model ready: 200 once ready, else 400",
                response_class=Response, responses=ready_responses)
    @router.get("/models/{name}/versions/{version}/ready", summary="Model ready",
                response_class=Response, responses=ready_responses)
    async def model_ready(models: Models, name: str, version: str = "") -> Response:
        try:
            served(models, name, version)
        except ApiError as exc:
            if exc.status != 503:
                raise
            return Response(status_code=400)
        return Response(status_code=200)

    infer_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": InferenceRequest.model_json_schema()},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    infer_responses = {**errors, 200: {"description": "the output tensors", "content": {
        "application/json": {}, "application/octet-stream": {}}}}

    @router.post("/models/{name}/infer", summary="Inference (JSON or binary tensors)",
                 responses=infer_responses, openapi_extra=infer_body)
    @router.post("/models/{name}/versions/{version}/infer", summary="Inference",
                 responses=infer_responses, openapi_extra=infer_body)
    async def infer(request: Request, models: Models, name: str, version: str = "") -> Response:
        return await answer(request, models, name, version)

    async def plain_infer(request: Request, name: str, version: str = "") -> Response:
        return await answer(request, request.app.state.repository, name, version)

    async def answer(request: Request, models: Repository, name: str, version: str) -> Response:
        service = served(models, name, version)
        request.state.model = service.labels  # the access log names the model and version
        with service.lease() as lease:
            return await infer_with(lease, request)

    async def infer_with(lease: Lease, request: Request) -> Response:
        service = lease.service
        encoding = request.headers.get("content-encoding")
        check_encoding(encoding)
        most = most_values(settings.max_batch, settings.max_len, service.model_input)
        cost = PARSED[service.model_input.kind]
        async with BodyHold(service.budget, settings.request_timeout_s, service.metrics) as hold:
            if encoding in (None, "", "identity"):
                raw = body = await read_body(request, hold, lambda size: parsed_bytes(size, most, cost),
                                             settings.max_body_bytes)
            else:  # the bytes sent, then what they inflate to, priced as it grows
                raw = await read_body(request, hold, lambda size: size, settings.max_body_bytes)
                sent = len(raw)
                async with hold.large_body_turn():  # growers in turn: none waits on another's growth
                    body = await inflated(raw, encoding, settings.max_body_bytes,
                                          lambda size: hold.to(sent + parsed_bytes(size, most, cost)))
            body_bytes = len(raw) + (len(body) if body is not raw else 0)  # both, when it was inflated
            opened, request_id = await parsed(
                decoded_body, len(body), body, request.headers.get("inference-header-content-length"), most,
                service.model_input, settings)
            del raw, body  # the input arrays are all that is kept
        plan, started = await admitted(lease, opened, False, body_bytes, settings.request_timeout_s)
        del opened
        header: dict[str, Any] = {"model_name": service.name, "model_version": str(service.version)}
        if request_id is not None:
            header["id"] = request_id
        return await http_answer(plan, header, started, settings.send_timeout_s)

    plain = plain_routes(router.routes, [PREFIX + path for path in ("/models/{name}/infer",
                                                                     "/models/{name}/versions/{version}/infer")],
                         plain_infer, protocol_refusal)
    return router, plain


def decoded_body(body: bytes, header_length: str | None, most: int, model_input: ModelInput,
                 settings: Settings) -> tuple[Decoded, str | None]:
    """The request a body carries, and its id; its parsed forms are gone on return."""
    json_header, binary = split_body(body, header_length)
    check_value_count(json_header, most)
    inference = parse_body(json_header, InferenceRequest)
    assert isinstance(inference, InferenceRequest)
    inputs = read_inputs(inference.inputs, binary)
    names, binary_flags = chosen_outputs(inference)
    return decoded(inputs, names, binary_flags, model_input, settings), inference.id


def read_inputs(inputs: list[RequestInput], binary: memoryview) -> list[Tensor]:
    """Each input from its JSON ``data``, or from its ``binary_data_size`` bytes of the binary
    data after the header, taken in the order of the inputs; every byte must be claimed."""
    tensors, offset = [], 0
    for item in inputs:
        size = item.parameters.get("binary_data_size")
        if size is None:
            if item.data is None:
                raise invalid(f"input '{item.name}' has neither data nor a binary_data_size")
            tensors.append(tensor_from_values(item.name, item.datatype, item.shape, item.data))
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise invalid(f"input '{item.name}': binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise invalid(f"input '{item.name}': binary_data_size {size} runs past the "
                          f"{len(binary)} bytes of binary data after the header")
        tensors.append(tensor_from_bytes(item.name, item.datatype, item.shape, binary[offset:offset + size]))
        offset += size
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data after the header belong to no input "
                      "(check binary_data_size and Inference-Header-Content-Length)")
    return tensors


def chosen_outputs(inference: InferenceRequest) -> tuple[list[str], list[bool]]:
    """The outputs to return (all when the request lists none, as the protocol says) and
    whether each goes as binary data (``binary_data``, else ``binary_data_output``)."""
    default = inference.parameters.get("binary_data_output", False)
    if inference.outputs is None:
        return list(OUTPUT_NAMES), [bool(default)] * len(OUTPUT_NAMES)
    names = [output.name for output in inference.outputs]
    check_output_names(names)
    for output in inference.outputs:
        if "classification" in output.parameters or "class_count" in output.parameters:
            raise invalid(f"output '{output.name}': the classification extension is not supported")
    return names, [bool(output.parameters.get("binary_data", default)) for output in inference.outputs]
