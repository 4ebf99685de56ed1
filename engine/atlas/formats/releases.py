"""SAELens release ids (``--release R --sae-id ID``) resolved against a local Hugging Face cache.

A release names a Hugging Face repo and, per SAE id, a folder inside it (SAELens'
``sae_lens/pretrained_saes.yaml``: ``release: {repo_id, model, conversion_func, saes: [{id, path}]}``).
The files are looked up offline in the hub cache laid out by ``huggingface_hub``:
``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``) /
``models--<org>--<repo>/snapshots/<revision>/<path>``, the revision read from ``refs/main``
(or the only snapshot). Nothing is downloaded.

The built-in table holds the releases whose id → path rule was checked against SAELens 6.18's
``pretrained_saes.yaml``: ``gemma-scope-2b-pt-res`` (every id is its path),
``gemma-scope-2b-pt-res-canonical`` (the 16k-wide ``layer_N/width_16k/canonical`` ids) and the six
``llama_scope_lx{r,a,m}_{8,32}x`` releases (``l{N}{r,a,m}_{8,32}x`` →
``Llama3_1-8B-Base-L{N}{R,A,M}-{8,32}x``). Where the ``sae_lens`` package is installed, its
packaged ``pretrained_saes.yaml`` adds every other release (read as data; sae_lens is not imported).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import BadValueError, FormatError, NotFoundError


@dataclasses.dataclass(frozen=True)
class Release:
    """One SAELens release: its repo, model, the reader of its SAEs, and the id → folder rule."""

    name: str
    repo_id: str
    model: str
    format: str  # a registered reader (engine.atlas.importers.FORMATS)
    path_of: Callable[[str], str | None]  # SAE id → folder in the repo; None: not an id of this release


@dataclasses.dataclass(frozen=True)
class ResolvedSAE:
    release: str
    sae_id: str
    repo_id: str
    revision: str
    path: Path  # the SAE's folder in the local cache
    model: str
    format: str


_GEMMA_ID = re.compile(r"(?:layer_\d+|embedding)/width_\w+/average_l0_\d+")
# gemma-scope-2b-pt-res-canonical, width 16k: layer → the average_l0 of its canonical SAE
_GEMMA_2B_CANONICAL_16K = {
    0: 105, 1: 102, 2: 141, 3: 59, 4: 124, 5: 68, 6: 70, 7: 69, 8: 71, 9: 73, 10: 77, 11: 80, 12: 82,
    13: 84, 14: 84, 15: 78, 16: 78, 17: 77, 18: 74, 19: 73, 20: 71, 21: 70, 22: 72, 23: 75, 24: 73, 25: 116,
}


def _gemma_path(sae_id: str) -> str | None:
    return sae_id if _GEMMA_ID.fullmatch(sae_id) else None


def _gemma_canonical(sae_id: str) -> str | None:
    m = re.fullmatch(r"layer_(\d+)/width_16k/canonical", sae_id)
    if not m or int(m.group(1)) not in _GEMMA_2B_CANONICAL_16K:
        return None
    layer = int(m.group(1))
    return f"layer_{layer}/width_16k/average_l0_{_GEMMA_2B_CANONICAL_16K[layer]}"


def _llama_scope(site: str, width: int) -> Callable[[str], str | None]:
    def path_of(sae_id: str) -> str | None:
        m = re.fullmatch(rf"l(\d+){site}_{width}x", sae_id)
        if not m or not 0 <= int(m.group(1)) < 32:
            return None
        return f"Llama3_1-8B-Base-L{int(m.group(1))}{site.upper()}-{width}x"

    return path_of


def _builtin() -> dict[str, Release]:
    out = {
        "gemma-scope-2b-pt-res": Release("gemma-scope-2b-pt-res", "google/gemma-scope-2b-pt-res", "gemma-2-2b",
                                         "gemmascope", _gemma_path),
        "gemma-scope-2b-pt-res-canonical": Release("gemma-scope-2b-pt-res-canonical", "google/gemma-scope-2b-pt-res",
                                                   "gemma-2-2b", "gemmascope", _gemma_canonical),
    }
    for site in "ram":
        for width in (8, 32):
            name = f"llama_scope_lx{site}_{width}x"
            out[name] = Release(name, f"fnlp/Llama3_1-8B-Base-LX{site.upper()}-{width}x", "meta-llama/Llama-3.1-8B",
                                "llama-scope", _llama_scope(site, width))
    return out


# SAELens conversion_func → the reader that reads that release's files.
_CONVERSIONS = {"gemma_2": "gemmascope", "llama_scope": "llama-scope", "sparsify": "eai-sparsify",
                "dictionary_learning_1": "dictionary_learning", None: "saelens", "sae_lens": "saelens"}


def _from_yaml(data: Any) -> dict[str, Release]:
    out: dict[str, Release] = {}
    if not isinstance(data, dict):
        return out
    for name, rel in data.items():
        if not isinstance(rel, dict) or rel.get("conversion_func") not in _CONVERSIONS or "repo_id" not in rel:
            continue
        paths = {str(s["id"]): str(s["path"]) for s in rel.get("saes") or [] if isinstance(s, dict) and "id" in s
                 and "path" in s}
        out[str(name)] = Release(str(name), str(rel["repo_id"]), str(rel.get("model") or ""),
                                 _CONVERSIONS[rel.get("conversion_func")], paths.get)
    return out


def sae_lens_table() -> Path | None:
    """The ``pretrained_saes.yaml`` packaged with an installed ``sae_lens``, if any (not imported)."""
    spec = importlib.util.find_spec("sae_lens")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained_saes.yaml"
    return path if path.is_file() else None


def releases(table: str | Path | None = None) -> dict[str, Release]:
    """Known releases: the built-in table, then those of ``table`` (a pretrained_saes.yaml; default:
    the installed sae_lens' one, when there is one), which win on a shared name."""
    out = _builtin()
    path = Path(table) if table is not None else sae_lens_table()
    if path is not None:
        yaml = importlib.import_module("yaml")
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise FormatError.at(path, f"not a readable pretrained_saes.yaml ({e})") from None
        out.update(_from_yaml(data))
    return out


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as huggingface_hub finds it (HF_HUB_CACHE, HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


@dataclasses.dataclass(frozen=True)
class SaeRelease:
    """SAE ``sae_id`` of the SAELens release ``release``, read offline from the Hugging Face cache
    ``cache`` (None: HF_HUB_CACHE / HF_HOME); what ``--release`` / ``--sae-id`` name (both needed)."""

    release: str | None
    sae_id: str | None
    cache: str | Path | None = None


def resolve_release(release: str, sae_id: str, *, cache: str | Path | None = None, revision: str | None = None,
                    table: str | Path | None = None) -> ResolvedSAE:
    """The local folder of SAE ``sae_id`` of ``release`` in the hub cache (offline; nothing is downloaded)."""
    known = releases(table)
    rel = known.get(release)
    if rel is None:
        raise BadValueError(f"unknown release {release!r}; known: {', '.join(sorted(known))} "
                            "(install sae-lens to read its whole table, or import the SAE folder by path)")
    sub = rel.path_of(sae_id)
    if sub is None:
        raise BadValueError(f"{sae_id!r} is not an SAE id of {release} (ids look like "
                            f"{_example(rel)}); see sae_lens' pretrained_saes.yaml")
    root = Path(cache).expanduser() if cache is not None else hub_cache()
    repo_dir = root / ("models--" + rel.repo_id.replace("/", "--"))
    fetch = f"`hf download {rel.repo_id} --include '{sub}/*'` (online) fetches it"
    if not repo_dir.is_dir():
        raise NotFoundError(f"{rel.repo_id} is not in the Hugging Face cache {root}; {fetch}, or set HF_HUB_CACHE")
    rev = revision or _revision(repo_dir)
    snap = repo_dir / "snapshots" / rev
    if not snap.is_dir():
        have = sorted(p.name for p in (repo_dir / "snapshots").glob("*")) if (repo_dir / "snapshots").is_dir() else []
        raise NotFoundError(f"{rel.repo_id}: no snapshot {rev} in {root} (have: {', '.join(have) or 'none'})")
    path = snap / sub
    if not path.exists():
        raise NotFoundError(f"{rel.repo_id}@{rev[:12]} in {root} has no {sub}; {fetch}")
    return ResolvedSAE(release, sae_id, rel.repo_id, rev, path, rel.model, rel.format)


def _revision(repo_dir: Path) -> str:
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        return ref.read_text().strip()
    snaps = sorted(p.name for p in (repo_dir / "snapshots").glob("*")) if (repo_dir / "snapshots").is_dir() else []
    if len(snaps) == 1:
        return snaps[0]
    raise NotFoundError(f"{repo_dir}: no refs/main and {len(snaps)} snapshots; write the commit to use into "
                        "refs/main (huggingface_hub does) or remove the other snapshots")


def _example(rel: Release) -> str:
    if rel.format == "llama-scope":
        m = re.search(r"LX(\w)-(\d+)x", rel.repo_id)
        return f"l12{m.group(1).lower()}_{m.group(2)}x" if m else "l12r_8x"
    if rel.name.endswith("canonical"):
        return "layer_12/width_16k/canonical"
    return "layer_12/width_16k/average_l0_82"
