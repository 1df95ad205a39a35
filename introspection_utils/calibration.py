"""``python -m introspection_utils.calibration``, the command's short form: runs
:mod:`introspection_utils.stats.synthetic_calibration` as a script (the code lives there; this entry module holds
nothing
else)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("introspection_utils.stats.synthetic_calibration", run_name="__main__", alter_sys=True)
