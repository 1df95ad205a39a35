"""Names across the package: what one module lends another is public (no ``from .x import _private``, no
``x._private``), and a public name means one thing (no two modules define the same public function or class).

Both are read from the source (``ast``), every module of the package, sub-packages included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "introspection_utils"
# Public names several modules define on purpose, each the same role in its own module -> why.
SHARED_NAMES: dict[str, str] = {
    "main": "each command's module has its command line as main() (python -m introspection_utils.<command>)",
}


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package as ``"folder.module"`` (``"folder.sub.module"`` in a sub-package)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if len(parts) > 1 and parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1:
            out[".".join(parts)] = path
    return out


def _private_borrowings(package: Path = PACKAGE) -> list[tuple[str, str, str]]:
    """``(importer, lender, name)`` for every underscore name one package module takes from another: imported by
    name, or read as an attribute of a package module it imported."""
    modules = _modules(package)
    found = []
    for importer, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases: dict[str, str] = {}  # local name -> package module it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("introspection_utils"):
                base = node.module.removeprefix("introspection_utils").lstrip(".")
                for alias in node.names:
                    full = f"{base}.{alias.name}" if base else alias.name
                    if full in modules:
                        aliases[alias.asname or alias.name] = full
                    elif alias.name.startswith("_") and not alias.name.startswith("__") and base != importer:
                        found.append((importer, base, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.name.removeprefix("introspection_utils.")
                    if alias.asname and name in modules:
                        aliases[alias.asname] = name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and aliases[node.value.id] != importer):
                found.append((importer, aliases[node.value.id], node.attr))
    return sorted(set(found))


def test_no_module_borrows_another_modules_private_name():
    borrowed = _private_borrowings()
    assert not borrowed, ("make these public in the module that defines them (or move them to where they are "
                          f"used): {[f'{i} takes {lender}.{name}' for i, lender, name in borrowed]}")


def test_the_check_sees_a_private_import_and_a_private_attribute(tmp_path):
    """The reader itself, on a made-up package: a module taking ``_x`` by name and one reading ``style._y`` are
    found; a module using its own ``_z`` and a dunder are not."""
    package = tmp_path / "introspection_utils"
    (package / "plotting").mkdir(parents=True)
    (package / "plotting" / "style.py").write_text("def _x(): ...\ndef _y(): ...\ndef _z(): ...\n_z()\n")
    (package / "plotting" / "curves.py").write_text("from introspection_utils.plotting.style import _x\n")
    (package / "plotting" / "tasks.py").write_text("from introspection_utils.plotting import style\nstyle._y()\n"
                                                   "print(style.__name__)\n")
    assert _private_borrowings(package) == [("plotting.curves", "plotting.style", "_x"),
                                            ("plotting.tasks", "plotting.style", "_y")]


def test_a_public_name_is_defined_in_one_module():
    """Two modules defining the same public function or class is two meanings for one name (``describe_ablation``
    once meant both the refusal ablation and the head ablation)."""
    where: dict[str, list[str]] = {}
    for module, path in _modules().items():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                where.setdefault(node.name, []).append(module)
    twice = {name: modules for name, modules in where.items() if len(modules) > 1 and name not in SHARED_NAMES}
    assert not twice, f"one name, several things: {twice}"


@pytest.mark.parametrize("module, old, new", [
    ("readings.sentences", "flip_scale", "sweep_flip_scale"),
    ("readings.sentences", "top_heads", "attention_top_heads"),
    ("readings.sentences", "describe_ablation", "describe_refusal_ablation"),
    ("experiments.mechanisms", "describe_ablation", "describe_head_ablation"),
    ("experiments.patching", "agreement", "attribution_agreement"),
    ("apps.explore", "check_parameters", "check_served_parameters"),
])
def test_a_renamed_function_answers_by_its_old_name_for_one_release_and_warns(module, old, new):
    from importlib import import_module

    mod = import_module(f"introspection_utils.{module}")
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{old} is renamed introspection_utils\.{module}\.{new}"):
        assert getattr(mod, old) is getattr(mod, new)
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        _ = mod.nothing_here


def test_the_map_in_the_design_doc_points_at_real_modules_and_names():
    """docs/design.md's map ("Where things live"): every path it names is a module of the package and defines the
    names listed beside it (a rename that forgets the map fails here)."""
    import re

    doc = (PACKAGE.parent / "docs" / "design.md").read_text(encoding="utf-8")
    table = doc.split("## Where things live: the map", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 8  # the eight look-ups of issue #31, and the definitions beside I
    for row in rows:
        _, where, names = (cell.strip() for cell in row.strip("|").split(" | "))
        path = PACKAGE / where.strip("`")
        assert path.is_file(), f"the map points at {where}, which does not exist"
        defined = {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.id for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.Assign)
                    for t in n.targets if isinstance(t, ast.Name)}
        defined |= {n.target.id for n in ast.parse(path.read_text(encoding="utf-8")).body
                    if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
        missing = [name for name in re.findall(r"`(\w+)`", names) if name not in defined]
        assert not missing, f"{where} does not define {missing}"
