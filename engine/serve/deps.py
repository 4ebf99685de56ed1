"""What the server's routers share: request limits, path parameters, the store and the model pool
as FastAPI dependencies (`StoreDep`, `ModelsDep`: read from ``app.state``, set by `create_app`)."""

from __future__ import annotations

import threading
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi import Path as PathParam

from engine.store.store import Store

MAX_BODY = 256 * 1024  # bytes of a request body: a text to explain is at most MAX_TEXT characters
MAX_TEXT = 8_000  # characters of a text to explain (a few pages; one forward pass)
MAX_PROMPT = 2_000
MAX_K = 100
MAX_PAGE = 1_000  # run rows per page
MAX_CONTEXTS = 1_000  # windows per concept and source (`atlas contexts --top` is at most this)
MAX_ORDINAL = 2**31 - 1

Ordinal = Annotated[int, PathParam(ge=0, le=MAX_ORDINAL, description="The concept's row in its atlas.")]
Name = Annotated[str, PathParam(min_length=1, max_length=200)]


def encodable(v: str) -> str:
    """``v`` if it is valid Unicode (no lone surrogates), else a ValueError (a 422)."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return v


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


def get_store(request: Request) -> Store:
    """The app's store."""
    store: Store = request.app.state.store
    return store


def get_models(request: Request) -> ModelPool:
    """The app's model pool."""
    models: ModelPool = request.app.state.models
    return models


StoreDep = Annotated[Store, Depends(get_store)]
ModelsDep = Annotated[ModelPool, Depends(get_models)]
