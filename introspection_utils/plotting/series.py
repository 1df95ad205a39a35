"""Deprecated path (one release): moved to :mod:`introspection_utils.plotting.curves`."""

from introspection_utils.core.deprecation import moved

__getattr__ = moved(
    __name__,
    "introspection_utils.plotting.curves",
    "introspection_utils.plotting.style",
    "introspection_utils.plotting.saving",
    "introspection_utils.plotting.summaries",
    "introspection_utils.plotting.refusal",
    "introspection_utils.core.paths",
)
