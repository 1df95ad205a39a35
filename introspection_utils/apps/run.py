"""Deprecated path (one release): moved to :mod:`introspection_utils.apps.runner.cli`."""

from introspection_utils.core.deprecation import moved

__getattr__ = moved(
    __name__,
    "introspection_utils.apps.runner.cli",
    "introspection_utils.apps.runner.checks",
    "introspection_utils.apps.runner.execute",
    "introspection_utils.apps.runner.findings",
    "introspection_utils.apps.runner.documents",
)

if __name__ == "__main__":
    import runpy

    runpy.run_module("introspection_utils.apps.runner.cli", run_name="__main__", alter_sys=True)
