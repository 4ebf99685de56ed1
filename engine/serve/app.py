"""The FastAPI app of `atlas serve`: JSON routes over the engine, the static page, and the guards.

The routes live in one router per page family (`engine.serve.routes`); they reach the store and
the model pool through the dependencies of `engine.serve.deps`, which read ``app.state``.

Why the routes are plain ``def`` functions: FastAPI runs those in its worker threads, so a long
request (explain, steer: a forward pass or a generation) never blocks the event loop, and a
search answers while a generation runs. Models load once per process (`ModelPool`) and are
shared; each has a lock, because steering adds forward hooks to the shared module for the length
of a generation and nothing else may run through it meanwhile.

Every user mistake is an `AtlasError` from the engine, or a request that fails validation here
(a negative k, a 1 MB text, a strength out of range): both become a 4xx whose body is
``{"detail": "<one line>"}``, never a 500.

Access: on a loopback address the app answers only requests whose ``Host`` is a loopback name
(a page on another site cannot reach it through DNS rebinding). With a token (required by
`engine.serve.server` for any other address) every request must carry it: the header
``Authorization: Bearer <token>`` or ``X-Atlas-Token``, or ``?token=`` once in the browser,
which then sets a same-site cookie for the page's own requests. A request without it gets 401.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import __version__
from engine.errors import AtlasError, NotFoundError
from engine.serve import pages
from engine.serve.deps import MAX_BODY, MAX_TEXT, ModelPool
from engine.serve.routes import ROUTERS
from engine.store.store import Store

__all__ = ["MAX_BODY", "MAX_TEXT", "create_app"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
TOKEN_COOKIE = "atlas_token"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{loc or 'request'}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return _one_line("; ".join(parts) + more)


def _is_loopback_host(host_header: str | None) -> bool:
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8765
        host = host[: host.find("]") + 1]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in LOOPBACK_HOSTS


# ---------------------------------------------------------------------- guards and errors


_TOO_LARGE = f"request body over {MAX_BODY // 1024} KiB; texts are limited to {MAX_TEXT} characters"


class BodyLimit:
    """The body size limit (`MAX_BODY`), as plain ASGI around the app: a ``Content-Length`` over it is
    refused before anything is read, and every body (a chunked one has no length) is counted as its
    pieces arrive: the piece that passes the limit ends the request with 413, so a 200 MiB chunked
    upload costs at most the limit in memory, never the whole body (uvicorn discards the rest of a body
    once the response is sent; the connection is kept, so the client reads its 413 and no reset)."""

    def __init__(self, app: Any, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await JSONResponse({"detail": _TOO_LARGE}, status_code=413)(scope, receive, send)
            return
        received, started = 0, False

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge(413, _TOO_LARGE)
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _BodyTooLarge:
            if not started:
                await JSONResponse({"detail": _TOO_LARGE}, status_code=413)(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from a request's ``receive`` once its body has passed the limit (`BodyLimit`): an HTTP
    413, so the route's body parsing passes it on and the app answers it like any HTTP error."""


async def guard(request: Request, call_next: Any) -> Response:
    """The token (when the app has one), else the loopback Host rule (the body size limit: `BodyLimit`)."""
    token: str | None = request.app.state.token
    given_query = request.query_params.get("token")
    if token is not None:
        auth = request.headers.get("authorization", "")
        given = (auth[7:] if auth.lower().startswith("bearer ") else None) or request.headers.get("x-atlas-token") \
            or given_query or request.cookies.get(TOKEN_COOKIE)
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return JSONResponse({"detail": "this server needs its token: header 'Authorization: Bearer <token>' "
                                           "or ?token=<token>"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
    elif request.app.state.loopback_only and not _is_loopback_host(request.headers.get("host")):
        return JSONResponse({"detail": "this server answers only requests addressed to 127.0.0.1 or localhost"},
                            status_code=403)
    response: Response = await call_next(request)
    if token is not None and given_query:
        response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
    return response


async def atlas_error(_request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": _one_line(str(exc))}, status_code=404 if isinstance(exc, NotFoundError) else 400)


async def bad_request(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _validation_message(exc)}, status_code=422)


async def http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"detail": _one_line(str(exc.detail))}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def overflow(_request: Request, _exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": "a number in the request is out of range"}, status_code=400)


# ---------------------------------------------------------------------- the app


def create_app(store: Store | str | Path, *, db_url: str | None = None, token: str | None = None,
               loopback_only: bool = True) -> FastAPI:
    """The app over ``store`` (an opened `Store` or its folder).

    ``token``: every request must carry it (401 otherwise). ``loopback_only`` (without a token):
    answer only requests addressed to a loopback host name.
    """
    if not isinstance(store, Store):
        store = Store.open(store, db_url=db_url)
    app = FastAPI(
        title="Concept Atlas", version=__version__, docs_url=None, redoc_url=None,  # offline docs: pages.mount
        description="The store's atlases, concepts, alignment maps and labelling runs; text lookup, explain and "
                    "steering, over the same engine functions as the `atlas` command line.",
    )
    app.state.store = store
    app.state.models = ModelPool(store)
    app.state.token = token
    app.state.loopback_only = loopback_only
    # innermost first: the route reads the body through BodyLimit's counting (an HTTP 413 from it reaches
    # the app's error handler as any HTTP error), and the guard decides before anything is read
    app.add_middleware(BodyLimit)
    app.middleware("http")(guard)
    app.add_exception_handler(AtlasError, atlas_error)
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(OverflowError, overflow)
    for router in ROUTERS:
        app.include_router(router)
    pages.mount(app, app.title)  # static files, offline API docs, the pages, a 404 page for any other path
    return app
