"""The notebook runner (``python -m introspection_utils.run``): :mod:`.cli` (the command line and the documents it
writes), :mod:`.checks` (parameters, models and plans checked before any kernel starts), :mod:`.execute` (papermill
runs, resumable series, timings), :mod:`.documents` (the timings table, the list, the guide), :mod:`.findings` (the science run from a findings file) and :mod:`.kernels` (warm
kernels side by side)."""
