"""``/docs`` (Swagger UI) and ``/redoc`` from assets installed with the service, never a CDN:
clusters that serve models are often air-gapped, and a docs page that loads its script from
the internet renders blank there.

The assets are the ones the fastapi-offline wheel ships. They are served by a plain route
rather than a ``StaticFiles`` mount, because a mount resolves its files against
``root_path``, which breaks behind a gateway that strips the prefix (``ROOT_PATH``).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from app.api.errors import ApiError

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSET_NAMES = frozenset(path.name for path in ASSETS.iterdir() if path.is_file())
# Swagger UI's validator badge sends the schema to validator.swagger.io: off.
SWAGGER_PARAMETERS = {"validatorUrl": None}


def include_docs(app: FastAPI) -> None:
    """Add the two pages and their assets; ``app`` must be created with ``docs_url=None``
    and ``redoc_url=None``."""
    router = APIRouter(include_in_schema=False)

    def assets(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}/docs-assets"

    def openapi_url(request: Request) -> str:
        return f"{request.scope.get('root_path', '')}{app.openapi_url}"

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url(request), title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{assets(request)}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets(request)}/swagger-ui.css",
            swagger_favicon_url=f"{assets(request)}/favicon.png",
            swagger_ui_parameters=SWAGGER_PARAMETERS,
        )

    @router.get("/redoc")
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url(request), title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets(request)}/redoc.standalone.js",
            redoc_favicon_url=f"{assets(request)}/favicon.png", with_google_fonts=False,
        )

    @router.get("/docs-assets/{name}")
    async def asset(name: str) -> FileResponse:
        if name not in ASSET_NAMES:  # only the shipped files: no path ever reaches the disk
            raise ApiError(404, "not_found", f"no docs asset {name!r}")
        return FileResponse(ASSETS / name, headers={"Cache-Control": "public, max-age=86400"})

    app.include_router(router)
