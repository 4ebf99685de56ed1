"""Concept Atlas: transferable interpretability for language models.

The public entry point is :class:`engine.store.store.Store`; functions in the submodules take and return
plain data (numpy arrays, dataclasses), and the `atlas` CLI is a thin layer over them.
"""

from engine.errors import AtlasError

__version__ = "0.1.0"

__all__ = ["AtlasError", "__version__"]
