"""Every error leaves as JSON: ``{"error": {"status", "type", "message", "details"?}}``."""

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
                   headers: dict[str, str] | None = None) -> Response:
    body: dict = {"status": status, "type": type_, "message": message}
    if details:
        body["details"] = details
    return Response(orjson.dumps({"error": body}), status_code=status, headers=headers,
                    media_type="application/json")


def validation_details(exc: ValidationError | RequestValidationError) -> list[dict]:
    """The first few problems, each with where it is and what is wrong (no echoed input)."""
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()[:MAX_DETAILS]]


def summarize(details: list[dict]) -> str:
    first = details[0]
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{where}: {first['msg']}{more}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> Response:
        return error_response(exc.status, exc.type, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def request_validation(_: Request, exc: RequestValidationError) -> Response:
        details = validation_details(exc)
        return error_response(422, "invalid_request", summarize(details), details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, "http_error", str(exc.detail), None,
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error; see the service log")
