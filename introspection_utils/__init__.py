"""introspection_utils: concept-injection ("injected thought") experiments on open chat models, traced with
nnsight; the names a user touches (``__all__``), imported on first use."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from introspection_utils.core.results import load_result
    from introspection_utils.engine.measure import Trial, measure
    from introspection_utils.engine.metadata import save_table
    from introspection_utils.engine.prompts import control_questions, introspection_prompt
    from introspection_utils.engine.vectors import (
        ConceptVector,
        concept_vectors,
        default_layer,
        default_layers,
        random_vector,
    )
    from introspection_utils.experiments.atlas import run_atlas
    from introspection_utils.experiments.sweeps import layer_sweep, scale_sweep
    from introspection_utils.models.handle import DEFAULT_MODEL, ModelHandle, load_model
    from introspection_utils.stats.verdicts import describe_verdict, verdicts

# name -> the module (under introspection_utils) that defines it
_HOMES = {
    "load_model": "models.handle", "ModelHandle": "models.handle", "DEFAULT_MODEL": "models.handle",
    "introspection_prompt": "engine.prompts", "control_questions": "engine.prompts",
    "concept_vectors": "engine.vectors", "random_vector": "engine.vectors", "ConceptVector": "engine.vectors",
    "default_layer": "engine.vectors", "default_layers": "engine.vectors",
    "Trial": "engine.measure", "measure": "engine.measure",
    "scale_sweep": "experiments.sweeps", "layer_sweep": "experiments.sweeps", "load_result": "core.results",
    "save_table": "engine.metadata",
    "run_atlas": "experiments.atlas",
    "verdicts": "stats.verdicts", "describe_verdict": "stats.verdicts",
}
__all__ = [
    "ConceptVector", "DEFAULT_MODEL", "ModelHandle", "Trial", "concept_vectors", "control_questions", "default_layer",
    "default_layers", "describe_verdict", "introspection_prompt", "layer_sweep", "load_model", "load_result", "measure",
    "random_vector", "run_atlas", "save_table", "scale_sweep", "verdicts",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f"introspection_utils.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'introspection_utils' has no attribute {name!r} (the public names: {__all__})")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
