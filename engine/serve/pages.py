"""The explorer's pages and the API docs, served offline.

Every page route answers the one HTML file (its script draws the page from the URL); a path that is
no page, API route or asset gets the same file with status 404, and the script shows "not found".
The API docs (/docs: Swagger UI, /redoc: ReDoc) load their scripts from the ``fastapi-offline``
package's files under /static/docs, never from a CDN: they work on a machine without internet. ReDoc's
bundle draws one outside image (Redocly's logo in its footer); it is served with that address replaced
by an empty image, so the docs make no request outside the server.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
DOCS_ASSETS = "/static/docs"
# the page's own routes (the script routes by the URL); each answers index.html
PAGES = ("/", "/c/{atlas:path}/{ordinal:int}", "/runs/{name:path}", "/explain", "/steer", "/a/{atlas:path}",
         "/m/{name:path}", "/models/{name:path}")
NOT_PAGES = ("/api/", "/static/", "/openapi.json")  # an unknown path under these is a JSON 404
REDOC_JS = "redoc.standalone.js"
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"  # the bundle's only outside address
EMPTY_IMAGE = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"  # 1x1, clear


def _docs_assets() -> Path | None:
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


@functools.cache
def _offline_redoc(path: Path) -> bytes:
    """ReDoc's bundle with its footer logo's outside address replaced by an empty image."""
    return path.read_bytes().replace(REDOC_LOGO.encode(), EMPTY_IMAGE.encode())


def index() -> FileResponse:
    """The page (one HTML file; its script routes by the URL)."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


def not_found(request: Request) -> Response:
    """Any other GET: the page with status 404 (it says "not found"), or a JSON 404 under the API."""
    path = request.url.path
    if path.startswith(NOT_PAGES):
        return JSONResponse({"detail": "Not Found"}, status_code=404)
    return FileResponse(STATIC / "index.html", media_type="text/html", status_code=404)


def favicon() -> FileResponse:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


def mount(app: FastAPI, title: str) -> None:
    """The static files, the API docs (give the app ``docs_url=None, redoc_url=None``), the pages and,
    last, the 404 page for every other GET."""
    assets = _docs_assets()
    if assets is not None:

        def redoc_js() -> Response:
            return Response(_offline_redoc(assets / REDOC_JS), media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=3600"})

        # before the mount below, which would otherwise answer this path with the file as it is
        app.add_api_route(f"{DOCS_ASSETS}/{REDOC_JS}", redoc_js, methods=["GET"], include_in_schema=False)
        app.mount(DOCS_ASSETS, StaticFiles(directory=assets), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    def swagger() -> HTMLResponse:
        if assets is None:
            return HTMLResponse("<p>The API docs need the serve extra (fastapi-offline): "
                                "pip install 'concept-atlas[serve]'; the schema is at /openapi.json</p>")
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{title} API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url="/static/favicon.svg")

    def redoc() -> HTMLResponse:
        if assets is None:
            return swagger()
        return get_redoc_html(openapi_url="/openapi.json", title=f"{title} API",
                              redoc_js_url=f"{DOCS_ASSETS}/{REDOC_JS}",
                              redoc_favicon_url="/static/favicon.svg", with_google_fonts=False)

    app.add_api_route("/docs", swagger, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False, response_class=HTMLResponse)
    app.add_api_route("/favicon.ico", favicon, methods=["GET"], include_in_schema=False, response_class=FileResponse)
    for route in PAGES:
        app.add_api_route(route, index, methods=["GET"], include_in_schema=False, response_class=FileResponse)
    app.add_api_route("/{path:path}", not_found, methods=["GET"], include_in_schema=False)
