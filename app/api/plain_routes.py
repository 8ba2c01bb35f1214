"""The inference routes answered as plain ASGI, in front of FastAPI's per-request machinery
(its routing over every route, dependency solving, exception middleware and wrappers),
which cost more CPU than the rest of a short request. Every other request, and every
method but POST, goes on to FastAPI unchanged.

Each :class:`PlainRoute` is also declared to FastAPI (which publishes it in the OpenAPI
document): the dispatcher matches the declared route's own pattern, sets ``scope["route"]``
to it (the request metrics' route label), and calls the same function the FastAPI
endpoint calls; an :class:`~app.api.errors.ApiError` leaves as that route's error handling
answers it. It sits inside :class:`~app.api.middleware.RequestEnvelope`, so limits, request
ids, metrics and the access log are the envelope's, as for any route.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from re import Pattern
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import ApiError

Answer = Callable[..., Awaitable[Response]]
Refusal = Callable[[ApiError, Request], Response]


@dataclass(frozen=True)
class PlainRoute:
    """``POST`` to ``route`` (as declared to FastAPI): ``answer(request, **path_params)``, or
    ``refusal(error, request)`` for an :class:`ApiError` it raises."""

    route: Route
    answer: Answer
    refusal: Refusal


def plain_routes(declared: Iterable[BaseRoute], paths: Iterable[str], answer: Answer,
                 refusal: Refusal) -> list[PlainRoute]:
    """The routes of ``declared`` (a router's) for ``POST`` to each of ``paths``, answered by
    ``answer``; their path parameters must all be strings, as ``answer`` takes them."""
    by_path = {route.path: route for route in declared
               if isinstance(route, Route) and "POST" in (route.methods or ())}
    plain = []
    for path in paths:
        route = by_path[path]
        assert all(convertor.regex == "[^/]+" for convertor in route.param_convertors.values()), path
        plain.append(PlainRoute(route, answer, refusal))
    return plain


class PlainDispatch:
    """ASGI middleware: ``POST`` to a :class:`PlainRoute` is answered here, the rest by ``app``."""

    def __init__(self, app: ASGIApp, plain: Iterable[PlainRoute]) -> None:
        self.app = app
        self.exact: dict[str, PlainRoute] = {}  # paths without parameters
        self.patterns: list[tuple[Pattern[str], PlainRoute]] = []
        for item in plain:
            if item.route.param_convertors:
                self.patterns.append((item.route.path_regex, item))
            else:
                self.exact[item.route.path] = item

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path = get_route_path(scope)
        found = self.exact.get(path)
        params: dict[str, Any] = {}
        if found is None:
            for pattern, candidate in self.patterns:
                match = pattern.match(path)
                if match is not None:
                    found, params = candidate, match.groupdict()
                    break
            else:
                await self.app(scope, receive, send)
                return
        route = found.route
        scope["route"], scope["endpoint"], scope["path_params"] = route, route.endpoint, params
        request = Request(scope, receive, send)
        try:
            response = await found.answer(request, **params)
        except ApiError as exc:
            response = found.refusal(exc, request)
        await response(scope, receive, send)
