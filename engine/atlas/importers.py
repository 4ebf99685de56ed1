"""Reading atlases in: SAE folders of several libraries, plain matrices, and label files.

Every reader returns plain data (`SAEWeights`, `LabelTable`) and validates at the boundary:
a malformed file raises `FormatError` naming the file and what was wrong (unreadable bytes, a
value of the wrong type in ``cfg.json``, a tensor that is not real numbers, a tensor whose shape
does not fit the SAE's d_in / d_sae), a dimension mismatch between labels and vectors raises
`ShapeError`. Nothing else escapes a reader, whatever the bytes. Readers are entries of a registry
(`register_format`: name, detect, read); `read_directions` takes the first whose ``detect``
accepts the path, or the one named with ``fmt``. SAELens, Gemma Scope and plain matrices are read
here; EleutherAI sparsify, dictionary_learning and Llama Scope in `engine.atlas.formats`.
`import_atlas` then hands the data to `Store.add_atlas`, which checks the vectors again and writes
them in one transaction.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from engine.atlas.formats import dictionary_learning, llama_scope, sparsify
from engine.atlas.formats.base import SAEWeights
from engine.atlas.formats.releases import SaeRelease, resolve_release
from engine.atlas.formats.saelens import with_activation
from engine.atlas.labels import read_labels
from engine.errors import AtlasError, BadValueError, FormatError
from engine.store.store import AtlasInfo, AtlasSource, IndexPlacement, Store
from engine.store.vectorfiles import open_tensors

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
GEMMASCOPE_PARAMS = "params.npz"

_HOOK_RE = re.compile(r"blocks\.(\d+)\.hook_(resid_post|resid_pre|resid_mid|mlp_out|attn_out)")


def _check_2d(name: str, path: Path, x: np.ndarray) -> np.ndarray:
    """``x`` as a float32 non-empty 2-D matrix of real numbers, or a `FormatError`."""
    x = _real(name, path, x)
    if x.ndim != 2 or 0 in x.shape:
        raise FormatError.at(path, f"{name} must be a non-empty 2-D matrix, got shape {x.shape}")
    return x


def _real(name: str, path: Path, x: object) -> np.ndarray:
    """``x`` as float32 if it holds real numbers (float, int); strings, objects, complex refused.

    A float32 memory map stays one (the store reads it a chunk of rows at a time)."""
    arr = np.asanyarray(x)
    if arr.dtype.kind not in "fiu":
        raise FormatError.at(path, f"{name} must hold real numbers (float or int), not dtype {arr.dtype}")
    if arr.dtype == np.float32:
        return arr
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(arr, dtype=np.float32)


def _tensor_shapes(path: Path, tensors: Mapping[str, object], d_in: int, d_sae: int) -> dict[str, np.ndarray]:
    """The encoder tensors present (keys W_enc, b_enc, b_dec, threshold), each checked against
    d_in / d_sae; a tensor of another shape or type is a `FormatError` naming it."""
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    out = {}
    for key, shape in shapes.items():
        value = tensors.get(key)
        if value is None:
            continue
        v = _real(key, path, value)
        if v.shape != shape:
            raise FormatError.at(path, f"{key} has shape {v.shape}; with d_in={d_in}, d_sae={d_sae} it must be {shape}")
        out[key] = v
    return out


def _cfg_int(cfg_path: Path, cfg: dict, key: str) -> int | None:
    value = cfg.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (
            isinstance(value, str) and not (value.strip().isascii() and value.strip().isdigit())):
        raise FormatError.at(cfg_path, f"{key} must be a whole number, got {value!r}"[:200])
    return int(value)


def _cfg_str(cfg_path: Path, cfg: dict, key: str) -> str | None:
    value = cfg.get(key)
    if value is not None and not isinstance(value, str):
        raise FormatError.at(cfg_path, f"{key} must be a string, got {value!r}"[:200])
    return value


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file, memory-mapped where numpy has their dtype (F32, F16,
    ...; BF16 has none: those are read by ``safetensors``)."""
    from safetensors.numpy import load_file

    try:
        return open_tensors(path)
    except (AtlasError, ValueError, KeyError, TypeError, OSError, OverflowError, MemoryError):
        pass  # not a file the mapping reader takes: safetensors reads it, or says what is wrong
    try:
        return load_file(str(path))
    except Exception as e:  # third-party parsing of arbitrary bytes: whatever it raises, the file is bad
        raise FormatError.at(path, f"not a readable safetensors file ({type(e).__name__}: {str(e)[:120]})") from None


# ---------------------------------------------------------------------- SAE folders


def read_saelens(folder: str | Path) -> SAEWeights:
    """A SAELens SAE folder: ``cfg.json`` + ``sae_weights.safetensors`` (``W_dec`` is [d_sae, d_in])."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FormatError(f"{folder}: not a folder (a SAELens SAE is a folder with {SAELENS_CFG})")
    cfg_path, w_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FormatError(f"{folder}: missing {p.name} (a SAELens folder has {SAELENS_CFG} and {SAELENS_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError.at(cfg_path, f"not valid JSON ({str(e)[:120]})") from None
    if not isinstance(cfg, dict):
        raise FormatError.at(cfg_path, "must hold a JSON object")
    nested = cfg.get("metadata")
    if nested is not None and not isinstance(nested, dict):
        raise FormatError.at(cfg_path, f"metadata must be a JSON object, got {nested!r}"[:200])
    meta = {**cfg, **(nested or {})}  # SAELens >= 6 nests provenance in "metadata"
    t = _load_safetensors(w_path)
    if "W_dec" not in t:
        raise FormatError.at(w_path, f"has no W_dec tensor (found: {', '.join(sorted(t)) or 'none'})")
    w_dec = _check_2d("W_dec", w_path, t["W_dec"])
    d_sae, d_in = w_dec.shape
    cfg_d_in, cfg_d_sae = _cfg_int(cfg_path, meta, "d_in"), _cfg_int(cfg_path, meta, "d_sae")
    if cfg_d_in not in (None, d_in) or cfg_d_sae not in (None, d_sae):
        raise FormatError.at(folder, f"cfg.json says d_in={cfg_d_in}, d_sae={cfg_d_sae}; W_dec is {w_dec.shape}")
    hook_name = _cfg_str(cfg_path, meta, "hook_name") or ""
    model_name = _cfg_str(cfg_path, meta, "model_name")
    m = _HOOK_RE.search(hook_name)
    layer = _cfg_int(cfg_path, meta, "hook_layer")
    if layer is None and m:
        layer = int(m.group(1))
    density = None
    sp_path = folder / SAELENS_SPARSITY
    if sp_path.is_file():
        sp = _load_safetensors(sp_path)
        if "sparsity" not in sp:
            raise FormatError.at(sp_path, f"has no sparsity tensor (found: {', '.join(sorted(sp)) or 'none'})")
        log_density = _real("sparsity", sp_path, sp["sparsity"])
        if log_density.shape != (d_sae,):
            raise FormatError.at(sp_path, f"sparsity has shape {log_density.shape}; W_dec has d_sae={d_sae} rows")
        with np.errstate(over="ignore"):
            density = np.power(10.0, log_density.astype(np.float64))  # stored as log10 density
    enc = _tensor_shapes(w_path, t, d_in, d_sae)
    return SAEWeights(
        W_dec=w_dec, W_enc=enc.get("W_enc"), b_enc=enc.get("b_enc"), b_dec=enc.get("b_dec"),
        threshold=enc.get("threshold"), density=density, model=model_name, layer=layer,
        hook=m.group(2) if m else None, source_kind="saelens",
    )


def read_gemmascope(path: str | Path) -> SAEWeights:
    """A Gemma Scope ``params.npz`` (``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``, ``threshold``)."""
    path = Path(path)
    if path.is_dir():
        path = path / GEMMASCOPE_PARAMS
    if not path.is_file():
        raise FormatError(f"{path}: no such file (a Gemma Scope SAE is a params.npz)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise ValueError("a single array, not an .npz archive")
            t = {k: z[k] for k in z.files}
    except Exception as e:  # third-party parsing of arbitrary bytes (zip, npy headers): the file is bad
        raise FormatError.at(path, f"not a readable .npz file ({type(e).__name__}: {str(e)[:120]})") from None
    if "w_dec" not in t:
        raise FormatError.at(path, f"has no w_dec array (found: {', '.join(sorted(t)) or 'none'})")
    w_dec = _check_2d("w_dec", path, t["w_dec"])
    d_sae, d_in = w_dec.shape
    enc = _tensor_shapes(path, {"W_enc": t.get("w_enc"), "b_enc": t.get("b_enc"), "b_dec": t.get("b_dec"),
                                "threshold": t.get("threshold")}, d_in, d_sae)
    # Gemma Scope folders are named like layer_12/width_16k/average_l0_71/params.npz
    m = re.search(r"layer_(\d+)", str(path))
    thr = enc.get("threshold")  # its JumpReLU is (pre > threshold) · relu(pre): a negative threshold acts as 0
    return SAEWeights(
        W_dec=w_dec, W_enc=enc.get("W_enc"), b_enc=enc.get("b_enc"), b_dec=enc.get("b_dec"),
        threshold=None if thr is None else np.maximum(thr, 0.0).astype(np.float32),
        layer=int(m.group(1)) if m else None, source_kind="gemmascope",
    )


def read_matrix(path: str | Path, key: str | None = None) -> SAEWeights:
    """A plain ``.npy`` or ``.safetensors`` matrix of directions, one per row."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False, mmap_mode="r")  # rows are read when imported
        except Exception as e:  # third-party parsing of arbitrary bytes: the file is bad
            raise FormatError.at(path, f"not a readable .npy file ({type(e).__name__}: {str(e)[:120]})") from None
        if not isinstance(x, np.ndarray):
            raise FormatError.at(path, "holds an archive, not one matrix")
    elif path.suffix == ".safetensors":
        t = _load_safetensors(path)
        if key is None:
            two_d = [k for k, v in t.items() if v.ndim == 2]
            if len(two_d) != 1:
                raise FormatError.at(path, f"holds {len(two_d)} matrices ({', '.join(two_d)}); name one with --key")
            key = two_d[0]
        if key not in t:
            raise FormatError.at(path, f"has no tensor {key!r} (found: {', '.join(sorted(t))})")
        x = t[key]
    else:
        raise FormatError.at(path, "unknown matrix format; use .npy or .safetensors")
    return SAEWeights(W_dec=_check_2d("the matrix", path, x), source_kind="matrix")


@dataclasses.dataclass(frozen=True)
class SAEFormat:
    """A registered reader: ``detect(path)`` says whether a path is in the format, ``read(path)`` reads it."""

    name: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], SAEWeights]
    description: str = ""


FORMATS: dict[str, SAEFormat] = {}


def register_format(name: str, detect: Callable[[Path], bool], read: Callable[[Path], SAEWeights],
                    description: str = "") -> None:
    """Add a reader; `read_directions` tries readers in registration order. A name is registered once."""
    if name in FORMATS:
        raise ValueError(f"SAE format {name!r} is already registered")
    FORMATS[name] = SAEFormat(name, detect, read, description)


register_format(sparsify.NAME, sparsify.detect, sparsify.read,  # before saelens: both have a cfg.json
                "EleutherAI sparsify hookpoint folder: cfg.json + sae.safetensors (TopK)")
register_format("saelens", lambda p: p.is_dir() and (p / SAELENS_CFG).is_file(),
                lambda p: with_activation(read_saelens(p), p), "SAELens folder: cfg.json + sae_weights.safetensors")
register_format(llama_scope.NAME, llama_scope.detect, llama_scope.read,
                "Llama Scope folder: hyperparams.json + checkpoints/final.safetensors")
register_format(dictionary_learning.NAME, dictionary_learning.detect, dictionary_learning.read,
                "dictionary_learning ae.pt (+ config.json): AutoEncoder, JumpReLU, TopK")
register_format("gemmascope", lambda p: p.suffix == ".npz" or (p.is_dir() and (p / GEMMASCOPE_PARAMS).is_file()),
                read_gemmascope, "Gemma Scope params.npz")
register_format("matrix", lambda p: p.is_file() and p.suffix in (".npy", ".safetensors"), read_matrix,
                "plain .npy / .safetensors matrix, one direction per row")


def read_directions(source: str | Path, fmt: str | None = None) -> SAEWeights:
    """Any supported source of directions: by what is on disk, or read as format ``fmt``."""
    p = Path(source)
    if fmt is not None:
        if fmt not in FORMATS:
            raise BadValueError(f"unknown SAE format {fmt!r}; one of: {', '.join(FORMATS)}")
        return FORMATS[fmt].read(p)
    for f in FORMATS.values():
        if f.detect(p):
            return f.read(p)
    if p.is_dir():
        raise FormatError(f"{p}: a folder in no known SAE layout (neither {SAELENS_CFG} (SAELens) nor "
                          f"{GEMMASCOPE_PARAMS} (Gemma Scope), sparsify's sae.safetensors, Llama Scope's "
                          "hyperparams.json nor dictionary_learning's ae.pt); name one with --format")
    return read_matrix(p)


# ---------------------------------------------------------------------- labels


# ---------------------------------------------------------------------- import


def import_atlas(
    store: Store,
    name: str,
    source: str | Path | None = None,
    *,
    labels: str | Path | None = None,
    site: AtlasSource = AtlasSource(),
    index: IndexPlacement = IndexPlacement(),
    key: str | None = None,
    fmt: str | None = None,
    release: SaeRelease | None = None,
) -> AtlasInfo:
    """Import directions from ``source`` (any registered format; ``fmt`` forces one) as an atlas.

    Instead of ``source``, ``release`` names an SAE of a SAELens release (`SaeRelease`), read offline
    from the local Hugging Face cache (its ``cache``, default: HF_HUB_CACHE / HF_HOME).
    ``site`` gives the model, layer, hook and revision where the file does not record them (or to
    override it); ``index`` how and where the index is built (`Store.add_atlas`; default a Flat FAISS file).
    The SAE's encoder and activation (ReLU, JumpReLU threshold, TopK k) are kept with the atlas.
    """
    # where the directions came from, meaningful from any folder: a path absolute (as typed it was relative
    # to wherever the command ran), a release as its id and the revision it resolved to
    source_ref = str(Path(source).expanduser().resolve()) if source is not None else None
    if release is not None:
        if source is not None or release.release is None or release.sae_id is None:
            raise BadValueError("give either SOURCE or both --release and --sae-id")
        found = resolve_release(release.release, release.sae_id, cache=release.cache)
        source, fmt = found.path, fmt or found.format
        site = dataclasses.replace(site, model=site.model or found.model or None)
        source_ref = f"{release.release}:{release.sae_id} ({found.repo_id}@{found.revision})"
    if source is None:
        raise BadValueError("give SOURCE (an SAE folder or file) or --release and --sae-id")
    sae = read_matrix(source, key) if key else read_directions(source, fmt)
    model = site.model or sae.model
    layer = site.layer if site.layer is not None else sae.layer
    if model is None:
        raise FormatError(f"{source}: the model is not recorded in the file; give it with --model")
    if layer is None:
        raise FormatError(f"{source}: the layer is not recorded in the file; give it with --layer")
    n = sae.W_dec.shape[0]
    table = read_labels(labels) if labels else None
    label_list, desc_list = table.for_n(n) if table else (None, None)
    return store.add_atlas(
        name, sae.W_dec, label_list, desc_list,
        source=dataclasses.replace(site, model=model, layer=int(layer), hook=site.hook or sae.hook or "resid_post",
                                   kind=sae.source_kind, ref=source_ref),
        index=index, encoder=sae.encoder(),
        densities=None if sae.density is None else [float(v) for v in sae.density],
        extra={"labels_file": str(Path(labels).expanduser().resolve()) if labels else None, "activation": sae.activation, "k": sae.k},
    )
