"""The notebook runner (``python -m introspection_utils.run``): :mod:`.cli` the command line, :mod:`.checks` what is
checked before any kernel starts, :mod:`.execute` the papermill runs, :mod:`.documents` the tables it writes,
:mod:`.findings` the science run from a findings file, :mod:`.kernels` warm kernels side by side."""
