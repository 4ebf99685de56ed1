"""Readers of SAE formats beyond SAELens / Gemma Scope / plain matrices, one module each.

Each module has a ``detect(path) -> bool`` and a ``read(path) -> SAEWeights``;
`engine.atlas.importers` registers them (`register_format`) and dispatches through the registry
(docs/design.md §4). `base` holds `SAEWeights` and the canonical encoder form every reader folds
its SAE into; `releases` resolves SAELens-style release ids against a local Hugging Face cache.
"""
