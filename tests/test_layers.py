"""Data flows one way: each module imports only from lower layers (the README's module table, layer by layer).

Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and do not count; imports inside functions do.
A module not listed here is not checked (add it where it belongs).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "introspection_utils"
LAYERS = {
    "paths": 0, "intervals": 0, "data": 0,
    "embedded": 1, "memory": 1,
    "models": 2,
    "prompts": 3,
    "vectors": 4,
    "inject": 5, "components": 5, "executors": 5,
    "generation": 6, "sweeps": 6, "probes": 6, "bench": 6, "attribution": 6, "refusal": 6, "demo": 6,
    "verdicts": 7, "grading": 7, "localization": 7, "tasks": 7, "patching": 7, "sae_train": 7, "frozen_prompts": 7,
    "metrics": 8, "readings": 8, "calibration": 8, "mechanisms": 8, "sae": 8,
    "plots": 9, "findings": 9,
    "plots_mechanisms": 10, "plots_refusal": 10, "plots_sae": 10, "plots_tasks": 10, "widgets": 10,
    "run": 11,
    "explore": 12,
}
# Known, owned exceptions: (importer, imported) -> why it is still here. None left.
EXCEPTIONS: dict[tuple[str, str], str] = {}


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


def test_the_readme_module_table_is_this_table():
    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    drawn = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[0].isdigit():
            for name in re.findall(r"`([a-z_]+)`", cells[1]):
                drawn[name] = int(cells[0])
    assert drawn == LAYERS
