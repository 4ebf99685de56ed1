"""Top contexts: per concept, the text windows of a corpus where it activates most (`atlas contexts`).

One pass of a corpus through a model, batched, keeps a running top-``k`` per concept in memory
(`TopWindows`: a few ``(n_concepts, k)`` arrays merged with each batch; never the activations of
the whole corpus), and stores the windows (`engine.store.contexts`).

What is scored, per token (docs/design.md §11):

- a source **atlas**: the residual of the atlas's own model at the atlas's site;
- a source **map**: the residual of the map's subject model at the map's subject site, mapped into
  the atlas (``map_activations``: an atlas-site residual), so a subject model's own tokens get the
  atlas concepts' top contexts;

then the atlas SAE's encoder where the atlas keeps one (`engine.atlas.encoder`: a token where a
feature does not fire is no context of it), else the projection on the concept's unit direction
(the atlas centre would add the same constant to every token of a concept, so the ranking is the
same with or without it).

A window is one per text and concept: the text's best token (the first of equal ones), with up to
``window`` characters either side, cut at spaces; ranks order by activation, then text index.

Resumable: texts go in chunks of ``chunk`` from text 0; each chunk's changed windows are written in
the transaction that advances ``n_done`` (`engine.store.contexts`). A re-run of the same source and
corpus reloads the stored windows into the running top-k and continues at ``n_done`` with the same
chunk boundaries (a no-op when done), so it ends with exactly the rows of an uninterrupted run;
``overwrite`` restarts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BadValueError, DuplicateError, NotFoundError, SiteMismatchError, SourceChangedError
from engine.progress import progress
from engine.store.contexts import ContextConflictError, ContextRun
from engine.store.store import Store
from engine.util import corpus_fingerprint

__all__ = [
    "DEFAULT_BATCH", "DEFAULT_CHUNK", "DEFAULT_TOP", "DEFAULT_WINDOW", "ContextConflictError", "ContextRun", "ContextSettings",
    "ContextSource", "TopWindows", "make_window", "resolve_source", "run_contexts", "top_contexts",
]

DEFAULT_TOP = 20
DEFAULT_CHUNK = 256  # texts per commit: the unit of resume
DEFAULT_BATCH = 16  # texts per forward pass
DEFAULT_WINDOW = 60  # characters either side of the token
MAX_TOP = 1000
_NO_TEXT = np.iinfo(np.int64).max  # an empty slot's text index: sorts after every real one


@dataclasses.dataclass(frozen=True)
class ContextSource:
    """Where the corpus goes: ``model`` at ``layer`` / ``hook``; through ``map`` into ``atlas`` if a map."""

    atlas: str
    map: str | None
    model: str
    layer: int
    hook: str


def resolve_source(store: Store, name: str) -> ContextSource:
    """An atlas or a map by name (``atlas:NAME`` / ``map:NAME`` where a name is both)."""
    kind, _, rest = name.partition(":")
    if kind in ("atlas", "map") and rest:
        want, name = kind, rest
    else:
        want = None
    atlases = {a.name for a in store.atlases()} if want != "map" else set()
    maps = {m.name for m in store.maps()} if want != "atlas" else set()
    if name in atlases and name in maps:
        raise BadValueError(f"{name!r} names an atlas and a map; say atlas:{name} or map:{name}")
    if name in atlases:
        a = store.atlas(name)
        return ContextSource(a.name, None, a.model, a.layer, a.hook)
    if name in maps:
        m = store.map_info(name)
        return ContextSource(m.atlas, m.name, m.subject_model, m.subject_layer, m.subject_hook)
    what = {"atlas": "atlas", "map": "map"}.get(want or "", "atlas or map")
    raise NotFoundError(f"no {what} named {name!r}; `atlas atlases` and `atlas maps` list them")


@dataclasses.dataclass(frozen=True)
class ContextSettings:
    """How a top-contexts run is computed: the ``top`` windows kept per concept, ``chunk`` texts per
    commit (the unit of resume), ``batch_size`` texts per forward pass, ``window`` characters either
    side of the token."""

    top: int = DEFAULT_TOP
    chunk: int = DEFAULT_CHUNK
    batch_size: int = DEFAULT_BATCH
    window: int = DEFAULT_WINDOW


# ---------------------------------------------------------------------- the running top-k


class TopWindows:
    """A running top-``k`` per concept: ``(n_concepts, k)`` arrays of activation, text index, token
    position and the token's character span in its text; empty slots have activation ``-inf``."""

    def __init__(self, n_concepts: int, k: int) -> None:
        self.k = k
        self.act = np.full((n_concepts, k), -np.inf, dtype=np.float32)
        self.text = np.full((n_concepts, k), _NO_TEXT, dtype=np.int64)
        self.pos = np.full((n_concepts, k), -1, dtype=np.int64)
        self.start = np.full((n_concepts, k), -1, dtype=np.int64)
        self.end = np.full((n_concepts, k), -1, dtype=np.int64)

    def merge(self, act: np.ndarray, text: np.ndarray, pos: np.ndarray, start: np.ndarray,
              end: np.ndarray) -> np.ndarray:
        """Merge candidates: ``act``, ``pos``, ``start``, ``end`` (n_texts, n_concepts), ``text`` (n_texts,)
        (``-inf``: not a candidate). Returns which concepts' top changed (n_concepts,) bool."""
        c = self.act.shape[0]
        a = np.concatenate([self.act, act.T.astype(np.float32)], axis=1)  # (C, k + B)
        t = np.concatenate([self.text, np.broadcast_to(text[None, :], (c, len(text)))], axis=1)
        t = np.where(np.isneginf(a), _NO_TEXT, t)
        order = np.lexsort((t, -a), axis=-1)[:, : self.k]  # activation desc, then text index asc
        new_text = np.take_along_axis(t, order, axis=1)
        changed = (new_text != self.text).any(axis=1)
        self.act = np.take_along_axis(a, order, axis=1)
        self.text = new_text
        for name, cand in (("pos", pos), ("start", start), ("end", end)):
            both = np.concatenate([getattr(self, name), cand.T], axis=1)
            setattr(self, name, np.take_along_axis(both, order, axis=1))
        return changed

    def load(self, rows: Sequence[tuple[Any, ...]]) -> None:
        """Restore from stored rows (tuples of `engine.store.contexts.ROW_FIELDS`)."""
        for o, rank, act, text, pos, _window, ws, ts, te in rows:
            j = int(rank) - 1
            self.act[o, j], self.text[o, j], self.pos[o, j] = act, text, pos
            self.start[o, j], self.end[o, j] = (ws + ts, ws + te) if ts >= 0 else (-1, -1)

    def rows(self, ordinals: np.ndarray, texts: Sequence[str], window: int) -> list[tuple[Any, ...]]:
        """The rows (tuples of `ROW_FIELDS`) of ``ordinals``' current windows."""
        out = []
        for o in ordinals.tolist():
            for j in range(self.k):
                if np.isneginf(self.act[o, j]):
                    break
                t = int(self.text[o, j])
                w, ws, ts, te = make_window(texts[t], int(self.start[o, j]), int(self.end[o, j]), window)
                out.append((o, j + 1, float(self.act[o, j]), t, int(self.pos[o, j]), w, ws, ts, te))
        return out


def make_window(text: str, start: int, end: int, window: int) -> tuple[str, int, int, int]:
    """``(window text, its offset in text, token start, token end in the window)`` around the token at
    ``[start, end)``: up to ``window`` characters either side, cut at a space where there is one.
    Unknown offsets (``-1``) give the text's first ``2 * window`` characters and span ``-1, -1``."""
    if start < 0 or end < start:
        return text[: 2 * window], 0, -1, -1
    lo, hi = max(0, start - window), min(len(text), end + window)
    if lo > 0 and not text[lo - 1].isspace():  # not mid-word
        cut = text.find(" ", lo, start)
        lo = cut + 1 if cut >= 0 else lo
    if hi < len(text) and not text[hi].isspace():
        cut = text.rfind(" ", end, hi)
        hi = cut if cut >= 0 else hi
    return text[lo:hi], lo, start - lo, end - lo


# ---------------------------------------------------------------------- the pass


def top_contexts(
    store: Store, source: str, corpus: str | Path, settings: ContextSettings | None = None, *,
    overwrite: bool = False, quiet: bool = False, max_chunks: int | None = None, model: Any = None,
    tokenizer: Any = None,
) -> ContextRun:
    """Run ``corpus`` (a corpus file, `engine.align.corpus.read_corpus`) through ``source`` (an atlas or a
    map) and store each concept's top ``settings.top`` windows (`ContextSettings`); continue the source's run if it has one for the
    same corpus and settings (a no-op when done), or replace it with ``overwrite``.

    ``max_chunks`` stops after that many chunks (the run stays ``interrupted``, to be continued).
    ``model``/``tokenizer`` default to the source's registered model.
    """
    from engine.align.corpus import read_corpus

    top, chunk, batch_size, window = dataclasses.astuple(settings or ContextSettings())
    if not 1 <= top <= MAX_TOP:
        raise BadValueError(f"--top must be between 1 and {MAX_TOP}, got {top}")
    for what, v in (("--chunk", chunk), ("--batch", batch_size)):
        if v < 1:
            raise BadValueError(f"{what} must be >= 1, got {v}")
    if window < 0:
        raise BadValueError(f"--window must be >= 0, got {window}")
    src = resolve_source(store, source)
    texts = read_corpus(corpus)
    fingerprint = corpus_fingerprint(texts)
    info = store.atlas(src.atlas)
    scoring = "encoder" if info.has_encoder else "projection"
    wanted: dict[str, Any] = {"top": top, "window": window, "scoring": scoring}
    run = store.context_run(src.atlas, src.map)
    if run is not None and not overwrite:
        was = {"top": run.top, "window": run.params.get("window"), "scoring": run.scoring}
        if run.fingerprint != fingerprint or was != wanted:
            raise DuplicateError(
                f"the {run.source} has top contexts of another corpus or settings ({run.corpus}, "
                f"fingerprint {run.fingerprint[:12]}, top {run.top}, {run.n_done}/{run.n_texts} texts); "
                "--overwrite replaces them"
            )
        if run.status == "done":
            return run
    if model is None or tokenizer is None:  # before a new run's row: a model that cannot load writes nothing
        from engine.models.loading import load_registered

        model, tokenizer = load_registered(store, src.model)
    if run is not None and overwrite:
        store.remove_context_run(run.id)
        run = None
    if run is None:
        run = store.add_context_run(
            src.atlas, src.map, corpus=str(corpus), fingerprint=fingerprint, top=top, n_texts=len(texts),
            chunk=chunk, scoring=scoring, params={"window": window, "batch_size": batch_size, "model": src.model,
                                                  "layer": src.layer, "hook": src.hook},
        )
    return run_contexts(store, run, texts, quiet=quiet, max_chunks=max_chunks, model=model, tokenizer=tokenizer)


def run_contexts(store: Store, run: ContextRun, texts: Sequence[str], *, quiet: bool = False,
                 max_chunks: int | None = None, model: Any = None, tokenizer: Any = None) -> ContextRun:
    """Carry out ``run`` over ``texts`` (its corpus) from ``n_done`` to the end, chunk by chunk."""
    import torch

    from engine.models.activations import collect
    from engine.models.hooks import Site
    from engine.models.loading import load_registered, model_fingerprint

    if run.status == "done":
        return run
    if run.status == "running":
        raise ContextConflictError(
            f"the top contexts of the {run.source} are being computed by process "
            f"{(run.params.get('worker') or {}).get('pid')}; wait for it or stop it first"
        )
    if corpus_fingerprint(texts) != run.fingerprint:
        raise SourceChangedError(f"the corpus of the {run.source}'s top contexts changed; --overwrite restarts")
    info = store.atlas(run.atlas)
    if info.vector_sha256 != run.params.get("atlas_vector_sha256"):
        raise SourceChangedError(f"atlas {run.atlas!r} was re-imported since its top contexts started; "
                                 "--overwrite restarts")
    amap = None
    if run.map is not None:
        if store.map_info(run.map).sha256 != run.params.get("map_sha256"):
            raise SourceChangedError(f"map {run.map!r} was refitted since its top contexts started; "
                                     "--overwrite restarts")
        from engine.align.map import load_map

        amap = load_map(store, run.map)
    model_name, layer, hook = run.params["model"], int(run.params["layer"]), str(run.params["hook"])
    if model is None or tokenizer is None:
        model, tokenizer = load_registered(store, model_name)
    fp = model_fingerprint(model)
    if run.params.get("model_fingerprint", fp) != fp:
        raise SourceChangedError(f"the weights of model {model_name!r} changed since the {run.source}'s top "
                                 "contexts started; --overwrite restarts")
    score = _scorer(store, info, amap)
    state = TopWindows(info.n_concepts, run.top)
    state.load(store.context_rows(run.id))
    job = store.context_pass(run)
    job.start({**run.params, "model_fingerprint": fp})

    window = int(run.params["window"])
    batch_size = int(run.params.get("batch_size") or DEFAULT_BATCH)
    bar = progress(total=run.n_texts, initial=run.n_done, desc=f"contexts {run.source}", unit="text", quiet=quiet)
    try:
        with job.running():
            for i, (lo, hi) in enumerate(job.steps()):
                if max_chunks is not None and i >= max_chunks:
                    break
                changed = np.zeros(info.n_concepts, dtype=bool)
                for b in collect(model, tokenizer, texts[lo:hi], Site((layer,), hook), batch_size=batch_size,
                                 desc=None, dtype=torch.float32):
                    bar.update(b.texts[1] - b.texts[0])
                    if b.n_tokens == 0:
                        continue
                    x = next(iter(b.acts.values())).numpy()
                    if amap is None and x.shape[1] != info.dim:
                        raise SiteMismatchError(f"model {model_name!r} has width {x.shape[1]} at layer {layer}; "
                                                f"atlas {info.name!r} has {info.dim}")
                    changed |= state.merge(*_best_per_text(b, x, score, lo))
                ordinals = np.flatnonzero(changed)
                job.commit_chunk(lo, hi, ordinals.tolist(), state.rows(ordinals, texts, window))
    finally:
        bar.close()
    return job.status()


def _scorer(store: Store, info: Any, amap: Any):
    """residuals (n, d) → scores (n, n_concepts); ``-inf`` where a token is no context of a concept."""
    from engine.atlas.encoder import AtlasEncoder
    from engine.store.layout import DIRECTIONS_KEY
    from engine.util import unit_rows

    tensors = store.atlas_tensors(info.name)
    encoder = AtlasEncoder.from_tensors(tensors) if info.has_encoder else None
    units = unit_rows(tensors[DIRECTIONS_KEY]).astype(np.float32).T  # (d, n_concepts)

    def score(x: np.ndarray) -> np.ndarray:
        if amap is not None:
            amap.check_site(None, None, x.shape[1])
            x = np.asarray(amap.map_activations(x), dtype=np.float32)
        if encoder is None:
            return np.asarray(x, dtype=np.float32) @ units
        acts = encoder.encode(x)
        return np.where(acts > 0, acts, -np.inf).astype(np.float32)

    return score


def _best_per_text(b: Any, x: np.ndarray, score: Any, offset: int) -> tuple[np.ndarray, ...]:
    """Per text of batch ``b`` (residuals ``x``) and concept, its best token (the first of equal ones):
    activation, text index (in the corpus: ``offset`` + the chunk's), position and character span,
    (n_texts, C) each. Scored one text at a time: (tokens of a text, C) floats, never a whole batch's."""
    texts, first = np.unique(b.text_index, return_index=True)  # a batch holds its texts' tokens in order
    bounds = [*first.tolist(), len(b.text_index)]
    parts = []
    for i in range(len(texts)):
        lo, hi = bounds[i], bounds[i + 1]
        s = score(x[lo:hi])  # (tokens, C)
        j = s.argmax(axis=0)  # (C,): the first maximum
        cols = np.arange(s.shape[1])
        parts.append((s[j, cols], b.position[lo + j], b.offsets[lo + j, 0], b.offsets[lo + j, 1]))
    act, pos, start, end = (np.stack([p[k] for p in parts]) for k in range(4))
    return act, texts + offset, pos, start, end
