"""The CLI's built-in plug-ins: command groups that register themselves (`engine.cli.load_plugins`).

Each module defines ``register(cli)`` and is declared as an entry point of the group
``concept_atlas.cli`` in pyproject.toml, as a third-party plug-in would be. These are the only CLI
modules that import ConceptWorld (`engine.world`) or the demo (`engine.demo`).
"""
