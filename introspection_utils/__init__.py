"""introspection_utils: concept-injection ("injected thought") experiments on open chat models, traced with nnsight.

Pipeline, one module per step, data flowing one way:
``models`` → ``prompts`` → ``vectors`` → ``inject`` → ``sweeps`` → ``plots`` / ``widgets`` / ``metrics``.

``load_model``, ``ModelHandle`` and ``DEFAULT_MODEL`` are imported on first use, so ``python -m
introspection_utils.apps.run --help`` answers without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from introspection_utils.models.handle import DEFAULT_MODEL, ModelHandle, load_model

__all__ = ["DEFAULT_MODEL", "ModelHandle", "load_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from introspection_utils.models import handle as models

        return getattr(models, name)
    raise AttributeError(f"module 'introspection_utils' has no attribute {name!r}")
