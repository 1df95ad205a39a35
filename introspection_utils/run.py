"""``python -m introspection_utils.run``, the command's short form: runs
:mod:`introspection_utils.apps.runner.cli` as a script (the code lives there; this entry module holds nothing else)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("introspection_utils.apps.runner.cli", run_name="__main__", alter_sys=True)
