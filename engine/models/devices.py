"""Devices and precision: where a model runs, in which dtype, and what to do when memory runs out.

``--device auto|cpu|cuda[:N]|mps`` and ``--dtype auto|float32|bfloat16|float16`` mean the same on
every command that runs a model. ``auto`` picks CUDA, then MPS, then the CPU; the dtype ``auto`` is
bfloat16 on a CUDA device that supports it and float32 elsewhere. A model larger than one device's
memory, on a machine with several GPUs and ``--device auto``, is spread over them with
``device_map="auto"`` (needs the ``accelerate`` package). Whatever the model's dtype, activations
leave the device as float32 (`ACTIVATION_DTYPE`) for the float64 statistics.

An out-of-memory error in a batch is not fatal: the batch is halved and retried
(`engine.models.activations.collect`); `is_oom` recognises the exception types torch raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import AtlasError, BadValueError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
ACTIVATION_DTYPE = torch.float32  # what activations are when they leave the device


def cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → ``cuda`` if available, else ``mps``, else ``cpu``; an unavailable device is a
    `BadValueError` saying which one to use instead."""
    if isinstance(spec, torch.device):
        return spec
    s = (spec or "auto").strip().lower()
    if s == "auto":
        return torch.device("cuda") if cuda_count() else torch.device("mps") if mps_available() else torch.device("cpu")
    if s == "cpu":
        return torch.device("cpu")
    if s == "mps":
        if not mps_available():
            raise BadValueError("--device mps: MPS (Apple GPU) is not available here; use --device cpu or auto")
        return torch.device("mps")
    if s == "cuda" or s.startswith("cuda:"):
        n = cuda_count()
        idx = 0 if s == "cuda" else _index(s)
        if not n:
            raise BadValueError(f"--device {s}: CUDA is not available here (torch {torch.__version__}); "
                                "use --device cpu or auto")
        if idx >= n:
            raise BadValueError(f"--device {s}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
        return torch.device("cuda", idx)
    raise BadValueError(f"--device must be one of {', '.join(DEVICE_CHOICES)}; got {spec!r}")


def _index(s: str) -> int:
    try:
        return int(s.split(":", 1)[1])
    except ValueError:
        raise BadValueError(f"--device {s}: expected cuda:N with N a number") from None


def auto_dtype(device: torch.device) -> torch.dtype:
    """What ``--dtype auto`` means on ``device``: bfloat16 on a CUDA device that supports it, else float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error of torch (CUDA, MPS or the generic type)."""
    types = tuple(t for t in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
                  if isinstance(t, type))
    if types and isinstance(exc, types):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps" and hasattr(torch, "mps"):
        torch.mps.empty_cache()


# ----------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class Placement:
    """How `load_model` places a model: on one device, or spread with ``device_map="auto"``."""

    device: torch.device
    device_map: str | None = None  # "auto": accelerate spreads the layers over the GPUs (and CPU)


def weights_bytes(source: str | Path) -> int | None:
    """Bytes of a local model's weight files (safetensors / bin); None for a hub id or no files."""
    p = Path(source).expanduser()
    if not p.is_dir():
        return None
    index = next((f for f in p.glob("*.index.json")), None)
    if index is not None:
        try:
            return int(json.loads(index.read_text())["metadata"]["total_size"])
        except (KeyError, ValueError, TypeError):
            pass
    files = [f for ext in ("*.safetensors", "*.bin") for f in p.glob(ext)]
    return sum(f.stat().st_size for f in files) or None


def choose_placement(spec: str | torch.device | None, n_bytes: int | None, *,
                     device_memory: list[int] | None = None, dtype_ratio: float = 1.0) -> Placement:
    """One device, unless ``spec`` is ``auto``, there are several CUDA devices, and the model
    (``n_bytes`` on disk × ``dtype_ratio`` for the load dtype, plus 20% for activations) fits on
    none of them: then ``device_map="auto"``. ``device_memory`` (bytes per GPU) defaults to the
    machine's; tests pass it."""
    device = resolve_device(spec)
    if not (isinstance(spec, str) and spec.strip().lower() == "auto") or n_bytes is None:
        return Placement(device)
    if device_memory is None:
        device_memory = [torch.cuda.get_device_properties(i).total_memory for i in range(cuda_count())]
    need = n_bytes * dtype_ratio * 1.2
    if len(device_memory) > 1 and need > max(device_memory):
        return Placement(device, "auto")
    return Placement(device)


def device_map_kwargs(placement: Placement) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments of a placement (``device_map="auto"`` needs accelerate)."""
    if placement.device_map is None:
        return {}
    import importlib.util

    if importlib.util.find_spec("accelerate") is None:
        raise AtlasError("the model is larger than one GPU and spreading it needs accelerate: "
                         "`pip install accelerate` (or pick one device with --device cuda:N)") from None
    return {"device_map": placement.device_map}
