"""The FastAPI app of `atlas serve`: JSON routes over the engine, the static page, and the guards.

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

import dataclasses
import hmac
import io
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Annotated, Any, Literal, cast

from fastapi import Body, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import __version__
from engine.errors import AtlasError, NotFoundError
from engine.store.store import Store
from engine.util import to_plain

STATIC = Path(__file__).parent / "static"
MAX_BODY = 256 * 1024  # bytes of a request body: a text to explain is at most MAX_TEXT characters
MAX_TEXT = 8_000  # characters of a text to explain (a few pages; one forward pass)
MAX_PROMPT = 2_000
MAX_K = 100
MAX_PAGE = 1_000  # run rows per page
MAX_CONTEXTS = 1_000  # windows per concept and source (`atlas contexts --top` is at most this)
MAX_ORDINAL = 2**31 - 1
STRENGTH_RANGE = 10.0  # |strength| in units of the site's typical residual norm; 1 already hurts fluency
PPL_GUARD = 2.0  # steered perplexity above this × unsteered is flagged (engine.steering.faithfulness's bound)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
TOKEN_COOKIE = "atlas_token"

Ordinal = Annotated[int, PathParam(ge=0, le=MAX_ORDINAL, description="The concept's row in its atlas.")]
Name = Annotated[str, PathParam(min_length=1, max_length=200)]


# ---------------------------------------------------------------------- request bodies


def _encodable(v: str) -> str:
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return v


class ExplainRequest(BaseModel):
    map: str = Field(min_length=1, max_length=200, description="Map whose subject model reads the text.")
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    k: int = Field(5, ge=1, le=20, description="Concepts per token.")
    raw: bool = Field(False, description="Search the mapped activation as is (default: minus the atlas centre).")
    summary: int = Field(20, ge=0, le=MAX_K, description="Concepts in the text-level summary.")

    _check_text = field_validator("text", "map")(_encodable)


class SteerRequest(BaseModel):
    map: str = Field(min_length=1, max_length=200)
    concepts: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=8, description="Concept ids (<atlas>/<ordinal>), labels or free text.")
    prompts: list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT)]] = Field(min_length=1, max_length=4)
    strength: float = Field(0.5, ge=-STRENGTH_RANGE, le=STRENGTH_RANGE,
                            description="× the subject site's typical residual norm (negative steers away).")
    layers: list[Annotated[int, Field(ge=-64, le=1024)]] | None = Field(None, max_length=8)
    mode: str = Field("add", min_length=1, max_length=40)
    positions: Literal["all", "new"] = "all"
    combine: int = Field(0, ge=0, le=20)
    max_new_tokens: int = Field(30, ge=1, le=100)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0, le=10.0)
    direction: Literal["transferred", "native"] = "transferred"

    @field_validator("concepts", "prompts")
    @classmethod
    def _texts(cls, v: list[str]) -> list[str]:
        for s in v:
            _encodable(s)
            if not s.strip():
                raise ValueError("must not be blank")
        return v

    _check_map = field_validator("map")(_encodable)


# ---------------------------------------------------------------------- shared models


class ModelPool:
    """Subject models loaded once per process, each with the lock its users take."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], tuple[Any, Any, threading.Lock]] = {}

    def get(self, name: str, kind: str | None = None) -> tuple[Any, Any, threading.Lock]:
        """``(model, tokenizer, lock)`` of a registered model; ``kind`` None: as registered."""
        kind = kind or self.store.model_extra(name).get("kind") or "causal"
        key = (name, kind)
        with self._lock:  # one load per model, however many requests ask at once
            if key not in self._models:
                from engine.models.loading import load_registered, quiet_transformers

                quiet_transformers()
                model, tokenizer = load_registered(self.store, name, kind=kind)  # type: ignore[arg-type]
                self._models[key] = (model, tokenizer, threading.Lock())
            return self._models[key]


# ---------------------------------------------------------------------- the app


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


def create_app(store: Store | str | Path, *, db_url: str | None = None, token: str | None = None,
               loopback_only: bool = True) -> FastAPI:
    """The app over ``store`` (an opened `Store` or its folder).

    ``token``: every request must carry it (401 otherwise). ``loopback_only`` (without a token):
    answer only requests addressed to a loopback host name.
    """
    if not isinstance(store, Store):
        store = Store.open(store, db_url=db_url)
    the_store: Store = store
    models = ModelPool(the_store)
    app = FastAPI(
        title="Concept Atlas", version=__version__,
        description="The store's atlases, concepts, alignment maps and labelling runs; text lookup, explain and "
                    "steering, over the same engine functions as the `atlas` command line.",
    )
    app.state.store = the_store
    app.state.models = models

    # ------------------------------------------------------------------ guards and errors

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        given_query = request.query_params.get("token")
        if token is not None:
            auth = request.headers.get("authorization", "")
            given = (auth[7:] if auth.lower().startswith("bearer ") else None) or request.headers.get("x-atlas-token") \
                or given_query or request.cookies.get(TOKEN_COOKIE)
            if not given or not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "this server needs its token: header 'Authorization: Bearer <token>' "
                                               "or ?token=<token>"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        elif loopback_only and not _is_loopback_host(request.headers.get("host")):
            return JSONResponse({"detail": "this server answers only requests addressed to 127.0.0.1 or localhost"},
                                status_code=403)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return JSONResponse({"detail": f"request body over {MAX_BODY // 1024} KiB; texts are limited to "
                                           f"{MAX_TEXT} characters"}, status_code=413)
        response: Response = await call_next(request)
        if token is not None and given_query:
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(AtlasError)
    async def atlas_error(_request: Request, exc: AtlasError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(str(exc))}, status_code=404 if isinstance(exc, NotFoundError) else 400)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": _one_line(str(exc.detail))}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(OverflowError)
    async def overflow(_request: Request, exc: OverflowError) -> JSONResponse:
        return JSONResponse({"detail": "a number in the request is out of range"}, status_code=400)

    # ------------------------------------------------------------------ store

    @app.get("/api/info", tags=["store"], summary="Version, store folder, what is installed")
    def info() -> dict[str, Any]:
        from engine.atlas.lookup import semantic_available

        return {"version": __version__, "store": str(the_store.path), "semantic": semantic_available(),
                "atlases": len(the_store.atlases()), "maps": len(the_store.maps()), "runs": len(the_store.runs())}

    @app.get("/api/atlases", tags=["store"], summary="Atlases (`atlas atlases`)")
    def atlases() -> list[dict[str, Any]]:
        return [to_plain(a) | {"site": a.site} for a in the_store.atlases()]

    @app.get("/api/maps", tags=["store"], summary="Alignment maps (`atlas maps`)")
    def maps() -> list[dict[str, Any]]:
        return to_plain(the_store.maps())

    @app.get("/api/lookup", tags=["concepts"], summary="Concepts ranked by text (`atlas lookup`)")
    def lookup(q: Annotated[str, Query(min_length=1, max_length=500, description="Words to look up.")],
               k: Annotated[int, Query(ge=1, le=MAX_K)] = 20,
               atlas: Annotated[str | None, Query(max_length=200, description="Only this atlas.")] = None,
               ) -> dict[str, Any]:
        from engine.atlas.lookup import lookup as run_lookup

        _encodable(q)
        hits = run_lookup(the_store, q, k=k, atlas=atlas or None)
        sites = {a.name: a.site for a in the_store.atlases()} if hits else {}
        return {"query": q, "hits": [to_plain(h) | {"site": sites.get(h.atlas)} for h in hits]}

    @app.get("/api/concepts/{atlas}/{ordinal}", tags=["concepts"], summary="A concept and its provenance (`atlas show`)")
    def concept(atlas: Name, ordinal: Ordinal) -> dict[str, Any]:
        c = the_store.concept(ordinal, atlas)
        a = the_store.atlas(atlas)
        return {"concept": to_plain(c) | {"ref": c.ref},
                "provenance": {"atlas": a.name, "model": a.model, "layer": a.layer, "hook": a.hook, "site": a.site,
                               "source_kind": c.source_kind or a.source_kind,
                               "source_file": c.source_ref or a.source_ref, "revision": a.revision,
                               "has_encoder": a.has_encoder, "dim": a.dim, "n_concepts": a.n_concepts}}

    @app.get("/api/concepts/{atlas}/{ordinal}/neighbors", tags=["concepts"],
             summary="Nearest concepts by direction (`atlas neighbors`)")
    def neighbors(atlas: Name, ordinal: Ordinal, k: Annotated[int, Query(ge=1, le=MAX_K)] = 10) -> list[dict[str, Any]]:
        return to_plain(the_store.neighbors(ordinal, k=k, atlas=atlas))

    @app.get("/api/concepts/{atlas}/{ordinal}/features", tags=["concepts"],
             summary="Subject features labelled with the concept, per map into its atlas (from labelling runs)")
    def concept_features(atlas: Name, ordinal: Ordinal,
                         limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50) -> list[dict[str, Any]]:
        the_store.concept(ordinal, atlas)  # 404 for an unknown concept
        rows = the_store.concept_labels(atlas, ordinal, limit=limit)
        out = []
        for m in the_store.maps():
            if m.atlas != atlas:
                continue
            out.append({"map": m.name, "subject_model": m.subject_model, "subject_layer": m.subject_layer,
                        "subject_hook": m.subject_hook,
                        "features": [{"run": r, "feature": f, "rank": rank, "score": score}
                                     for r, map_name, f, rank, score in rows if map_name == m.name]})
        return out

    @app.get("/api/concepts/{atlas}/{ordinal}/contexts", tags=["concepts"],
             summary="Top activating text windows of the concept, per model that read the corpus (`atlas contexts`)")
    def concept_contexts(atlas: Name, ordinal: Ordinal,
                         limit: Annotated[int, Query(ge=1, le=MAX_CONTEXTS)] = 20) -> list[dict[str, Any]]:
        the_store.concept(ordinal, atlas)  # 404 for an unknown concept
        return [{"source": run.source, "atlas": run.atlas, "map": run.map, "model": run.model,
                 "layer": run.params.get("layer"), "hook": run.params.get("hook"), "corpus": run.corpus,
                 "scoring": run.scoring, "status": run.status, "n_done": run.n_done, "n_texts": run.n_texts,
                 "top": run.top, "contexts": [to_plain(c) | {"token": c.token} for c in found]}
                for run, found in the_store.concept_contexts(atlas, ordinal, limit=limit)]

    # ------------------------------------------------------------------ runs

    @app.get("/api/runs", tags=["runs"], summary="Labelling runs (`atlas runs`)")
    def runs() -> list[dict[str, Any]]:
        return to_plain(the_store.runs())

    @app.get("/api/runs/{name}", tags=["runs"], summary="One labelling run")
    def run(name: Name) -> dict[str, Any]:
        return to_plain(the_store.run(name))

    @app.get("/api/runs/{name}/rows", tags=["runs"],
             summary="One page of a run's features with their hits, sorted by feature, top score or margin")
    def run_rows(name: Name,
                 order: Annotated[Literal["feature", "score", "margin"], Query()] = "feature",
                 desc: bool = False,
                 offset: Annotated[int, Query(ge=0, le=MAX_ORDINAL)] = 0,
                 limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100) -> dict[str, Any]:
        from engine.labelling.export import label_page

        r = the_store.run(name)
        page = label_page(the_store, name, order, descending=desc, offset=offset, limit=limit)
        return {"run": to_plain(r), "total": r.n_done, "order": order, "desc": desc, "offset": offset, "limit": limit,
                "rows": [{"feature": fl.feature, "margin": fl.margin, "hits": to_plain(fl.hits)} for fl in page]}

    @app.get("/api/runs/{name}/export", tags=["runs"], summary="A run's labels as a file (`atlas export`)",
             response_class=StreamingResponse)
    def export(name: Name, format: Literal["jsonl", "csv", "neuronpedia"] = "jsonl",
               partial: bool = False) -> StreamingResponse:
        from engine.labelling.export import export_run

        spool = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        try:
            text = io.TextIOWrapper(cast(IO[bytes], spool), encoding="utf-8", newline="")
            export_run(the_store, name, text, format, partial=partial)
            text.flush()
            text.detach()
            spool.seek(0)
        except BaseException:
            spool.close()
            raise

        def chunks() -> Iterator[bytes]:
            try:
                while block := spool.read(1 << 16):
                    yield block
            finally:
                spool.close()

        ext = "csv" if format == "csv" else "jsonl"
        media = "text/csv" if format == "csv" else "application/x-ndjson"
        return StreamingResponse(chunks(), media_type=media,
                                 headers={"Content-Disposition": f'attachment; filename="{name}.{format}.{ext}"'})

    # ------------------------------------------------------------------ explain and steer

    @app.post("/api/explain", tags=["models"],
              summary="Per token: the top atlas concepts through a map; the text's concepts by max / mean (`atlas explain`)")
    def explain(req: Annotated[ExplainRequest, Body()]) -> dict[str, Any]:
        from engine.align.map import load_map
        from engine.search import explain as run_explain
        from engine.search import explain_summary

        amap = load_map(the_store, req.map)
        model, tokenizer, lock = models.get(amap.subject_model)
        with lock:
            tokens = run_explain(the_store, amap, req.text, req.k, centre=not req.raw, model=model, tokenizer=tokenizer)
        return {"map": req.map, "subject_model": amap.subject_model, "atlas": amap.atlas, "tokens": to_plain(tokens),
                "summary": {"max": to_plain(explain_summary(tokens, "max")[: req.summary]),
                            "mean": to_plain(explain_summary(tokens, "mean")[: req.summary])}}

    @app.post("/api/steer", tags=["models"],
              summary="Steered and unsteered continuations from the same seed, with perplexities and the plan (`atlas steer`)")
    def steer(req: Annotated[SteerRequest, Body()]) -> dict[str, Any]:
        from engine.steering.plan import PlanConcept, SteeringPlan, run_plan

        fields = req.model_dump(exclude={"concepts", "prompts"})
        plan = SteeringPlan(concepts=[PlanConcept(c) for c in req.concepts], **fields)
        subject = the_store.map_info(plan.map).subject_model
        model, tokenizer, lock = models.get(subject, "causal")  # generation needs the LM head
        with lock:
            result = run_plan(the_store, plan, list(req.prompts), model=model, tokenizer=tokenizer, model_name=subject)
        out = to_plain(dataclasses.replace(result, outputs=[]))
        out["outputs"] = [{"prompt": p.prompt, "unsteered": p.unsteered, "steered": p.steered} for p in result.outputs]
        ratio = result.perplexity_steered / result.perplexity_unsteered if result.perplexity_unsteered > 0 else None
        out["perplexity_ratio"] = ratio
        out["fluency_ok"] = ratio is None or ratio <= PPL_GUARD
        out["fluency_bound"] = PPL_GUARD
        return out

    # ------------------------------------------------------------------ the page

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    page = STATIC / "index.html"

    def index() -> FileResponse:
        return FileResponse(page, media_type="text/html")

    for route in ("/", "/c/{atlas}/{ordinal}", "/runs/{name}", "/explain", "/steer"):
        app.add_api_route(route, index, methods=["GET"], include_in_schema=False, response_class=FileResponse)
    return app
