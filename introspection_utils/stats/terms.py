"""Deprecated path (one release): moved to :mod:`introspection_utils.stats.definitions`."""

from introspection_utils.core.deprecation import moved

__getattr__ = moved(__name__, "introspection_utils.stats.definitions")
