"""Apps: what a user runs — the notebook runner, the web explorer and its widgets, the benchmark, the demo, the
frozen-prompt writer and the findings writer. Each command keeps its short form ``python -m introspection_utils.<name>``
(a thin entry module at the package's top level)."""
