"""Steering vectors for other runtimes: what a plan adds to the residual stream, as files.

An additive plan adds, at the output of each of its subject blocks ``L``, the vector
``v_L = Σ_concepts strength × norm_L × u`` at every position (`engine.steering.edits`). That
vector is exactly what a control vector is in llama.cpp and repeng, so a plan exports as:

- ``gguf``: a llama.cpp control vector, keyed as llama.cpp's cvector-generator writes it
  (tools/cvector-generator/cvector-generator.cpp ``export_gguf``, ggml-org/llama.cpp@2fb62f8):
  ``general.architecture = "controlvector"``, ``controlvector.model_hint`` = llama.cpp's
  architecture name of the model (its GGUF ``general.architecture``: ``llama``, ``gptneox``,
  ``gpt2``, ... — `llama_cpp_arch`), ``controlvector.layer_count`` an INT32, one F32 tensor
  ``direction.<L>`` per layer. llama.cpp adds ``direction.<L>`` to the output of block ``L``
  (0-based), the same site as ours; it has no slot for block 0 (``direction.0`` is invalid), so
  such a plan is refused.
- ``repeng``: the GGUF that repeng's ``ControlVector.export_gguf`` writes and ``import_gguf``
  reads (``controlvector.model_hint`` = the HF ``model_type``, ``controlvector.layer_count`` a UINT32,
  ``direction.<L>`` keyed by the block index of its ``ControlModel``);
  ``model.set_control(vector, coeff=1.0)`` then adds what the plan adds.
- ``safetensors``: tensors ``layer.<L>`` with the plan's provenance in the metadata.

Every format carries the provenance (subject model, layers, strength units, concepts, maps and
their checksums, method, atlas) as metadata. Clamp edits depend on the residual they edit, and
edits of generated positions only depend on a prompt length no runtime knows: both are refused.
Writers register by name (`register_steering_format`), so a new runtime is one function.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import BadValueError
from engine.registry import Registry
from engine.steering.plan import SteeringPlan, resolve_plan
from engine.store.store import Store
from engine.util import write_atomic_with

GGUF_ARCH = "controlvector"
META_PREFIX = "concept_atlas"  # provenance keys in GGUF metadata: concept_atlas.<key>


@dataclass(frozen=True)
class SteeringVectors:
    """What a plan adds at each subject layer: ``layers[L]`` (d_subject,) float32, and where from."""

    layers: dict[int, np.ndarray]
    model_hint: str  # the subject model's HF model_type (e.g. "gpt_neox"), as repeng names it
    provenance: dict[str, str] = field(default_factory=dict)  # plain strings: every format can hold them
    architecture: str = ""  # the subject's HF class (e.g. "GPTNeoXForCausalLM"): llama.cpp's name comes from it


Writer = Callable[[SteeringVectors, Path], None]
STEERING_FORMATS: Registry[Writer] = Registry("steering export format")


def register_steering_format(name: str) -> Callable[[Writer], Writer]:
    """Register ``writer(vectors, path)`` as export format ``name`` (once)."""
    return STEERING_FORMATS.register(name)


def steering_vectors(store: Store, plan: SteeringPlan) -> SteeringVectors:
    """Resolve ``plan`` and sum its edits per layer into the vectors the executor adds."""
    if plan.mode != "add":
        raise BadValueError(f"a {plan.mode!r} plan cannot be exported: only additive edits are a fixed vector "
                            "(use --mode add)")
    if plan.positions != "all":
        raise BadValueError("a plan that edits only generated positions cannot be exported: other runtimes add a "
                            "control vector at every position (use --positions all)")
    resolved = resolve_plan(store, plan)
    layers: dict[int, np.ndarray] = {}
    for e in resolved.edits:
        v = layers.setdefault(e.layer, np.zeros(e.dim, dtype=np.float64))
        v += e.target * np.asarray(e.direction, dtype=np.float64)  # strength × norm × unit direction
    info = store.get_model(resolved.subject_model)
    prov = plan.provenance or {}
    maps = prov.get("maps", {})
    provenance = {
        "subject_model": resolved.subject_model,
        "subject_source": info.source or "",
        "layers": ",".join(str(L) for L in sorted(layers)),
        "hook": "resid_post",
        "strength_units": "x the typical residual norm of the subject site (mean L2 norm, from the map's fit)",
        "strengths": json.dumps({c.ref: c.strength for c in resolved.concepts}),
        "norms": json.dumps({str(L): n for L, n in sorted(resolved.norms.items())}),
        "concepts": json.dumps([{"ref": c.ref, "label": c.label, "neighbours": c.neighbours}
                                for c in resolved.concepts]),
        "atlas": str(prov.get("atlas", "")),
        "atlas_vectors_sha256": str(prov.get("atlas_vectors_sha256", "")),
        "maps": json.dumps(maps),
        "method": ",".join(sorted({str(m.method) for m in resolved.alignment.values()})),
        "direction": plan.direction,
        "plan": json.dumps(plan.to_dict()),
    }
    return SteeringVectors({L: v.astype(np.float32) for L, v in sorted(layers.items())},
                           _model_hint(info.source, info.architecture), provenance, info.architecture or "")


def export_steering(store: Store, plan: SteeringPlan, path: str | Path, fmt: str = "gguf") -> SteeringVectors:
    """Write the steering vectors of ``plan`` to ``path`` in format ``fmt``; returns what was written."""
    writer = STEERING_FORMATS.get(fmt)
    if writer is None:
        raise BadValueError(f"unknown steering export format {fmt!r}; known: {', '.join(sorted(STEERING_FORMATS))}")
    vectors = steering_vectors(store, plan)
    write_atomic_with(Path(path), lambda tmp: writer(vectors, tmp))  # a reader never sees half a file
    return vectors


def _model_hint(source: str | None, architecture: str | None) -> str:
    """The model type runtimes use (``config.json``'s ``model_type``), else the recorded architecture."""
    if source:
        cfg = Path(source).expanduser() / "config.json"
        if cfg.is_file():
            try:
                return str(json.loads(cfg.read_text(encoding="utf-8")).get("model_type") or architecture or "")
            except (OSError, ValueError):
                pass
    return architecture or ""


# HF model class → llama.cpp architecture (gguf.MODEL_ARCH member), as llama.cpp's converter registers them
# (convert_hf_to_gguf.py / conversion/*.py: ``@ModelBase.register("<class>")`` + ``model_arch``); the name
# written is gguf-py's MODEL_ARCH_NAMES of that member, the ``general.architecture`` of the converted model.
_LLAMA_CPP_ARCH = {
    "LlamaForCausalLM": "LLAMA", "MistralForCausalLM": "LLAMA", "MixtralForCausalLM": "LLAMA",
    "GPTNeoXForCausalLM": "GPTNEOX", "GPT2LMHeadModel": "GPT2", "GPTJForCausalLM": "GPTJ",
    "Qwen2ForCausalLM": "QWEN2", "Qwen2MoeForCausalLM": "QWEN2MOE", "Qwen3ForCausalLM": "QWEN3",
    "Qwen3MoeForCausalLM": "QWEN3MOE", "GemmaForCausalLM": "GEMMA", "Gemma2ForCausalLM": "GEMMA2",
    "Gemma3ForCausalLM": "GEMMA3", "PhiForCausalLM": "PHI2", "Phi3ForCausalLM": "PHI3",
    "StableLmForCausalLM": "STABLELM", "FalconForCausalLM": "FALCON", "RWForCausalLM": "FALCON",
    "BloomForCausalLM": "BLOOM", "OlmoForCausalLM": "OLMO", "Olmo2ForCausalLM": "OLMO2",
    "GPTBigCodeForCausalLM": "STARCODER", "Starcoder2ForCausalLM": "STARCODER2", "MPTForCausalLM": "MPT",
    "SmolLM3ForCausalLM": "SMOLLM3",
}


def llama_cpp_arch(architecture: str, model_type: str) -> str:
    """llama.cpp's architecture name (``gptneox``) of an HF model class (``GPTNeoXForCausalLM``); for a class
    not in the table, ``model_type`` when llama.cpp has an architecture of that name (with or without its
    underscores: ``gpt_neox`` → ``gptneox``), else ``model_type`` as it is."""
    from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES

    member = _LLAMA_CPP_ARCH.get(architecture)
    if member is not None and hasattr(MODEL_ARCH, member):
        return MODEL_ARCH_NAMES[getattr(MODEL_ARCH, member)]
    names = set(MODEL_ARCH_NAMES.values())
    for candidate in (model_type, model_type.replace("_", ""), model_type.replace("_", "-")):
        if candidate in names:
            return candidate
    return model_type


def _write_gguf(vectors: SteeringVectors, path: Path, *, llama_cpp: bool) -> None:
    import gguf

    if llama_cpp and 0 in vectors.layers:
        raise BadValueError("llama.cpp control vectors have no slot for block 0's output (direction.0 is invalid); "
                            "steer a later layer, or export --format repeng or safetensors")
    writer = gguf.GGUFWriter(str(path), GGUF_ARCH)
    if llama_cpp:  # as cvector-generator: the architecture name, an INT32 count
        writer.add_string(f"{GGUF_ARCH}.model_hint", llama_cpp_arch(vectors.architecture, vectors.model_hint))
        writer.add_int32(f"{GGUF_ARCH}.layer_count", len(vectors.layers))
    else:  # as repeng's ControlVector.export_gguf: the HF model_type, a UINT32 count
        writer.add_string(f"{GGUF_ARCH}.model_hint", vectors.model_hint)
        writer.add_uint32(f"{GGUF_ARCH}.layer_count", len(vectors.layers))
    for key, value in vectors.provenance.items():
        writer.add_string(f"{META_PREFIX}.{key}", value)
    for layer, v in vectors.layers.items():
        writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(v, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@register_steering_format("gguf")
def _gguf(vectors: SteeringVectors, path: Path) -> None:
    _write_gguf(vectors, path, llama_cpp=True)


@register_steering_format("repeng")
def _repeng(vectors: SteeringVectors, path: Path) -> None:
    _write_gguf(vectors, path, llama_cpp=False)


@register_steering_format("safetensors")
def _safetensors(vectors: SteeringVectors, path: Path) -> None:
    from safetensors.numpy import save_file

    meta: dict[str, Any] = {"format": "concept-atlas steering vectors", "model_hint": vectors.model_hint,
                            **vectors.provenance}
    save_file({f"layer.{L}": np.ascontiguousarray(v) for L, v in vectors.layers.items()}, str(path), metadata=meta)
