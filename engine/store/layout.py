"""File names and folders of a store, in one place (docs/design.md §3)."""

from __future__ import annotations

from pathlib import Path

DB_FILE = "atlas.db"
VECTORS_DIR = "vectors"  # <atlas>.safetensors: the source of truth for directions
INDEXES_DIR = "indexes"  # <atlas>.faiss: derived, rebuildable
MAPS_DIR = "maps"  # <map>.safetensors: alignment-map tensors
MODELS_DIR = "models"  # models the store built itself (ConceptWorld)
ACTIVATIONS_DIR = "activations"  # optional activation caches
STORE_DIRS = (VECTORS_DIR, INDEXES_DIR, MAPS_DIR, MODELS_DIR, ACTIVATIONS_DIR)

# Tensor names inside an atlas vector file.
DIRECTIONS_KEY = "directions"  # (n_concepts, d): decoder rows / concept directions, as imported
ENCODER_KEYS = ("W_enc", "b_enc", "b_dec", "threshold")  # kept when an SAE carries them


def vector_file(name: str) -> str:
    return f"{VECTORS_DIR}/{name}.safetensors"


def index_file(name: str) -> str:
    return f"{INDEXES_DIR}/{name}.faiss"


def label_index_file(name: str) -> str:
    return f"{INDEXES_DIR}/{name}.labels.faiss"


def map_file(name: str) -> str:
    return f"{MAPS_DIR}/{name}.safetensors"


def sqlite_url(root: Path) -> str:
    return f"sqlite:///{(root / DB_FILE).resolve()}"
