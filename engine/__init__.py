"""Concept Atlas: transferable interpretability for language models.

The public API, importable from ``engine`` directly (each name lives in the module its concept
owns; see docs/design.md §2 and the README's architecture section):

- the store: `Store` (models, atlases and concepts, alignment maps, labelling runs), `AtlasError`;
- atlases: `import_atlas`, `SaeRelease`, `register_format`, `lookup`;
- models: `load_model`, `load_registered`, `Site`;
- alignment: `AlignmentMap`, `PairingConfig`, `accumulate_pairs`, `fit_map`, `AlignRequest`,
  `align_subject`, `align_layers`, `register_method`;
- search: `search`, `explain`, `token_stat` (a map's token statistic: criteria and whitening over activations);
- labelling: `label_features`, `run_labelling`, `export_run`, `register_feature_source`,
  `register_label_format`;
- steering: `SteeringEdit`, `SteeringPlan`, `PlanConcept`, `run_plan`, `generate_pair`,
  `GenerationSettings`, `register_mode`, `register_native_directions`, `export_steering`,
  `register_steering_format`.

ConceptWorld is a plug-in, not part of the core: ``from engine.world import build_world``.
Names are imported on first use, so ``import engine`` (and ``atlas --help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine.errors import AtlasError

if TYPE_CHECKING:
    from engine.align.fit import accumulate_pairs, align_layers, align_subject, fit_map
    from engine.align.map import AlignmentMap
    from engine.align.methods import register_method
    from engine.align.pairing import PairingConfig
    from engine.align.request import AlignRequest
    from engine.atlas.formats.releases import SaeRelease
    from engine.atlas.importers import import_atlas, register_format
    from engine.atlas.lookup import lookup
    from engine.labelling.export import export_run, register_label_format
    from engine.labelling.run import label_features, run_labelling
    from engine.labelling.sources import register_feature_source
    from engine.models.hooks import Site
    from engine.models.loading import load_model, load_registered
    from engine.search import explain, search, token_stat
    from engine.steering.edits import SteeringEdit, register_mode
    from engine.steering.export import export_steering, register_steering_format
    from engine.steering.generate import GenerationSettings, generate_pair
    from engine.steering.native import register_native_directions
    from engine.steering.plan import PlanConcept, SteeringPlan, run_plan
    from engine.store.store import Store

__version__ = "0.1.0"

_EXPORTS = {
    "Store": "engine.store.store",
    "import_atlas": "engine.atlas.importers",
    "SaeRelease": "engine.atlas.formats.releases",
    "register_format": "engine.atlas.importers",
    "lookup": "engine.atlas.lookup",
    "load_model": "engine.models.loading",
    "load_registered": "engine.models.loading",
    "Site": "engine.models.hooks",
    "AlignmentMap": "engine.align.map",
    "PairingConfig": "engine.align.pairing",
    "accumulate_pairs": "engine.align.fit",
    "fit_map": "engine.align.fit",
    "align_subject": "engine.align.fit",
    "align_layers": "engine.align.fit",
    "AlignRequest": "engine.align.request",
    "register_method": "engine.align.methods",
    "search": "engine.search",
    "explain": "engine.search",
    "token_stat": "engine.search",
    "label_features": "engine.labelling.run",
    "run_labelling": "engine.labelling.run",
    "export_run": "engine.labelling.export",
    "register_label_format": "engine.labelling.export",
    "register_feature_source": "engine.labelling.sources",
    "SteeringEdit": "engine.steering.edits",
    "register_mode": "engine.steering.edits",
    "export_steering": "engine.steering.export",
    "register_steering_format": "engine.steering.export",
    "generate_pair": "engine.steering.generate",
    "GenerationSettings": "engine.steering.generate",
    "register_native_directions": "engine.steering.native",
    "SteeringPlan": "engine.steering.plan",
    "PlanConcept": "engine.steering.plan",
    "run_plan": "engine.steering.plan",
}

__all__ = [
    "AlignRequest", "AlignmentMap", "AtlasError", "GenerationSettings", "PairingConfig", "PlanConcept", "SaeRelease", "Site", "SteeringEdit", "SteeringPlan",
    "Store", "__version__", "accumulate_pairs", "align_layers", "align_subject", "explain", "export_run", "export_steering",
    "fit_map", "generate_pair", "import_atlas", "label_features", "load_model", "load_registered", "lookup",
    "register_feature_source", "register_format", "register_label_format", "register_method",
    "register_mode", "register_native_directions", "register_steering_format", "run_labelling", "run_plan",
    "search", "token_stat",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
