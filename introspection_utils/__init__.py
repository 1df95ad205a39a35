"""introspection_utils: concept-injection ("injected thought") experiments on open chat models, traced with nnsight.

Pipeline, one module per step, data flowing one way:
``models`` → ``prompts`` → ``vectors`` → ``inject`` → ``sweeps`` → ``plots`` / ``widgets`` / ``metrics``.
"""

from introspection_utils.models import DEFAULT_MODEL, ModelHandle, load_model

__all__ = ["DEFAULT_MODEL", "ModelHandle", "load_model"]
