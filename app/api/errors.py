"""Every error leaves as JSON:
``{"error": {"status", "type", "message", "details"?, "request_id"}}``, or as the Open
Inference Protocol's ``{"error": "message"}`` under ``/v2``."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("app.api")
MAX_DETAILS = 10


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, details: list[dict] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message = status, type_, message
        self.details, self.headers = details, headers


def error_response(status: int, type_: str, message: str, details: list[dict] | None = None,
                   headers: dict[str, str] | None = None, request_id: str | None = None) -> Response:
    return Response(error_body(status, type_, message, details, request_id), status_code=status,
                    headers=headers, media_type="application/json")


def error_body(status: int, type_: str, message: str, details: list[dict] | None = None,
               request_id: str | None = None) -> bytes:
    body: dict = {"status": status, "type": type_, "message": message}
    if details:
        body["details"] = details
    if request_id:
        body["request_id"] = request_id
    return orjson.dumps({"error": body})


def protocol_error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """The Open Inference Protocol's error: ``{"error": "message"}`` (routes under ``/v2``)."""
    return Response(orjson.dumps({"error": message}), status_code=status, headers=headers,
                    media_type="application/json")


UNION_TAGS = frozenset({"int", "float"})  # a token is ``int | float``: one problem, not two


def validation_details(exc: ValidationError | RequestValidationError) -> list[dict]:
    """The first few problems, each with where it is and what is wrong (no echoed input)."""
    details: dict[tuple, dict] = {}
    for error in exc.errors():
        loc = tuple(part for part in error.get("loc", ()) if part not in UNION_TAGS)
        details.setdefault(loc, {"loc": list(loc), "msg": error.get("msg", ""),
                                 "type": error.get("type", "")})
        if len(details) == MAX_DETAILS:
            break
    return list(details.values())


def summarize(details: list[dict]) -> str:
    first = details[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def api_error_response(exc: ApiError, request: Request) -> Response:
    """How an :class:`ApiError` leaves a route outside ``/v2``."""
    return error_response(exc.status, exc.type, exc.message, exc.details, exc.headers, request_id_of(request))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return api_error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def request_validation(request: Request, exc: RequestValidationError) -> Response:
        details = validation_details(exc)
        return error_response(422, "invalid_request", summarize(details), details,
                              request_id=request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, "http_error", str(exc.detail), None,
                              getattr(exc, "headers", None), request_id_of(request))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path,
                      extra={"request_id": request_id_of(request)})
        return error_response(500, "internal_error", "internal error; see the service log",
                              request_id=request_id_of(request))
