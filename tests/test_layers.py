"""Data flows one way: each module imports only from lower layers (the README's module table, layer by layer).

Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and do not count; imports inside functions do.
A module not listed here is not checked (add it where it belongs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "introspection_utils"
LAYERS = {
    "paths": 0, "intervals": 0, "data": 0,
    "models": 1, "memory": 1,
    "prompts": 2,
    "vectors": 3,
    "inject": 4,
    "generation": 5, "sweeps": 5, "probes": 5, "bench": 5,
    "metrics": 6, "localization": 6, "grading": 6, "readings": 6, "refusal": 6, "sae": 6,
    "plots": 7,
    "widgets": 8,
    "run": 8, "demo": 8, "frozen_prompts": 8,
    "explore": 9,
}
# Known, owned, being removed: (importer, imported) -> why it is still here.
EXCEPTIONS = {
    ("sae", "plots"): "sae draws its own figure (the SAE split moves it)",
    ("models", "memory"): "models and memory import each other (the cycle is being broken)",
}


def _package_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module == "introspection_utils":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("introspection_utils."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("introspection_utils.")}
    return found


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_module_imports_only_from_lower_layers(module):
    imported = _package_imports(PACKAGE / f"{module}.py") & set(LAYERS)
    upward = sorted(m for m in imported if LAYERS[m] >= LAYERS[module] and (module, m) not in EXCEPTIONS)
    assert not upward, f"{module} (layer {LAYERS[module]}) imports {[(m, LAYERS[m]) for m in upward]}"


def test_every_package_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert not modules - set(LAYERS), f"place these in LAYERS (and the README's table): {modules - set(LAYERS)}"
