"""The model repository extension, as Triton serves it: ``POST /v2/repository/index``,
``/v2/repository/models/{name}/load`` and ``/unload`` (the routes here), and the gRPC
``RepositoryIndex``, ``RepositoryModelLoad`` and ``RepositoryModelUnload``
(:mod:`.grpc_service`), both through the functions here, over the same
:class:`~app.service.repository.Repository` as the rest of the service. Each transport first
checks the caller (:mod:`.admin`); then the model's name is checked as a name, never a path
(400), and the parameters (load takes none: never a configuration or model files, which come
from the repository alone; unload takes Triton's ``unload_dependents``, which changes nothing
here, where no model depends on another).

Errors: an unknown model 404, a load or unload that cannot be done (``MODEL_CONTROL`` not
explicit, every version failed) 400 with the reason, the server still starting 503.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from app.api.dataplane import Models
from app.api.errors import ApiError
from app.api.json_body import parse_body
from app.api.kserve import PREFIX
from app.api.kserve.admin import AdminGate
from app.api.kserve.rest import ProtocolRoute
from app.api.kserve.wire import ProtocolError, RepositoryControlRequest, RepositoryIndexRequest
from app.api.routes import json_response
from app.service.layout import scan, valid_name
from app.service.repository import ControlError, Repository, UnknownModel

Body = TypeVar("Body", bound=BaseModel)
_carried: set[asyncio.Task] = set()  # loads and unloads whose callers left: referenced until done


async def index(repository: Repository, ready_only: bool) -> list[dict]:
    """Every version known, with its state and reason; unless ``ready_only``, also every model
    of the repository not loaded yet, by its name alone (as Triton lists one)."""
    entries = repository.index(ready_only)
    if ready_only or repository.root is None:
        return entries
    try:
        on_disk = await asyncio.to_thread(scan, repository.root)
    except FileNotFoundError:
        return entries
    listed = {entry["name"] for entry in entries}
    entries += [{"name": name} for name in on_disk if name not in listed]
    return sorted(entries, key=lambda entry: entry["name"])


async def load(repository: Repository, name: str, parameters: Mapping[str, Any]) -> None:
    checked_name(name)
    for key in parameters:
        if key == "config" or key.startswith("file:"):
            raise ApiError(400, "invalid_parameter", f"load parameter '{key}': this server never takes a "
                           "model's configuration or files over the API; put the model in the repository "
                           "and load it by name")
        raise ApiError(400, "invalid_parameter", f"unrecognized load parameter '{key}' (load takes none)")
    await _control(repository, repository.load, name)


async def unload(repository: Repository, name: str, parameters: Mapping[str, Any]) -> None:
    checked_name(name)
    for key, value in parameters.items():
        if key != "unload_dependents":
            raise ApiError(400, "invalid_parameter",
                           f"unrecognized unload parameter '{key}' (unload takes unload_dependents)")
        if not isinstance(value, bool):
            raise ApiError(400, "invalid_parameter", "unload parameter 'unload_dependents' must be a boolean")
    await _control(repository, repository.unload, name)


def checked_name(name: str) -> str:
    if not valid_name(name):
        raise ApiError(400, "invalid_name", f"invalid model name {name!r}: a name is letters, digits, "
                       "'_', '.' and '-' (starting with a letter or digit, without '..'), never a path")
    return name


async def _control(repository: Repository, change: Callable[[str], Awaitable[None]], name: str) -> None:
    """``change(name)`` run to its end even when the caller goes away (a load cut short would
    leave its version half brought up); its refusals as the protocol's errors."""
    if not repository.started or repository.draining:
        raise ApiError(503, "not_ready", "the server is starting or stopping: load and unload "
                       "once it is ready", headers={"Retry-After": "1"})
    task = asyncio.ensure_future(change(name))
    _carried.add(task)
    task.add_done_callback(_settled)
    try:
        await asyncio.shield(task)
    except UnknownModel as exc:
        raise ApiError(404, "unknown_model", str(exc)) from None
    except ControlError as exc:
        raise ApiError(400, "control_refused", str(exc)) from None


def _settled(task: asyncio.Task) -> None:
    _carried.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: the caller, if still there, was told


def build_repository_router(gate: AdminGate) -> APIRouter:
    """The routes, published in the OpenAPI document only when the extension is on."""
    router = APIRouter(prefix=PREFIX + "/repository", route_class=ProtocolRoute,
                       tags=["Open Inference Protocol: model repository"], include_in_schema=gate.enabled)
    responses: dict[int | str, dict[str, Any]] = {code: {"model": ProtocolError}
                                                  for code in (400, 401, 403, 404, 503)}
    done = {"response_class": Response, "responses": {**responses, 200: {"description": "done (empty body)"}}}

    @router.post("/index", summary="The models and versions of the repository, with their states",
                 responses=responses)
    async def repository_index(request: Request, models: Models) -> Response:
        gate.check(request.headers.get("authorization"))
        body = optional_body(await request.body(), RepositoryIndexRequest)
        return json_response(await index(models, body.ready))

    # {name:path}: a name holding '/' (or %2F) reaches the name check and its 400, not a 404
    @router.post("/models/{name:path}/load", summary="Load or reload a model from the repository", **done)
    async def repository_load(request: Request, models: Models, name: str) -> Response:
        gate.check(request.headers.get("authorization"))
        request.state.model = (checked_name(name), None)  # the access log names the model
        await load(models, name, optional_body(await request.body(), RepositoryControlRequest).parameters)
        return Response(status_code=200, media_type="application/json")  # no body, as Triton answers

    @router.post("/models/{name:path}/unload", summary="Unload a model (its requests in flight finish)",
                 **done)
    async def repository_unload(request: Request, models: Models, name: str) -> Response:
        gate.check(request.headers.get("authorization"))
        request.state.model = (checked_name(name), None)
        await unload(models, name, optional_body(await request.body(), RepositoryControlRequest).parameters)
        return Response(status_code=200, media_type="application/json")

    return router


def optional_body(raw: bytes, model: type[Body]) -> Body:
    """The body's request, or the defaults when there is none (tritonclient's index sends none)."""
    parsed = parse_body(raw, model) if raw.strip() else model()
    assert isinstance(parsed, model)
    return parsed
