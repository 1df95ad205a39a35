"""Data flows one way between the package's role folders: a module imports only from its own folder or from folders
below it (``FOLDERS``), and no import cycle exists anywhere in the package.

Imports under ``if TYPE_CHECKING:`` are annotations, not dependencies, and do not count; imports inside functions do.
The modules at the package's top level are ``__init__`` (the public API, imported lazily) and the commands' short
entry forms (``python -m introspection_utils.run``), each of which only runs its command's module.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "introspection_utils"
# Role folders, bottom to top. Folders of the same rank are peers: neither imports the other.
FOLDERS = {
    "core": 0,         # paths, data, intervals: nothing model-specific
    "models": 1,       # the handle, the embedded models, memory estimates
    "engine": 2,       # prompts, vectors, the injection pass, components, generation, executors
    "stats": 3,        # pure table code: every definition and test
    "experiments": 4,  # one module per experiment, each serving an entry of the registry (apps/catalog.py)
    "readings": 5,     # sentences
    "plotting": 5,     # figures
    "apps": 6,         # runner, explorer, bench, demo, frozen prompts, findings
}
# The commands' short forms at the top level -> the module each one runs (and nothing else).
ENTRY_POINTS = {
    "run": "apps.runner.cli", "findings": "apps.findings", "bench": "apps.bench", "explore": "apps.explore",
    "demo": "apps.demo", "frozen_prompts": "apps.frozen_prompts", "calibration": "stats.synthetic_calibration",
}
MAX_LINES = 400  # a module longer than this says why at its top (LONG_REASON), or is split along its roles
HARD_LINES = 500  # no module is longer than this, whatever its reason
LONG_REASON = re.compile(r"over 400 lines because \w", re.IGNORECASE)  # in the module docstring
# Modules whose reason is being written on another branch -> who writes it. Only shrinks; empty it at merge.
REASON_FROM_ANOTHER_BRANCH: dict[str, str] = {}


def _modules() -> dict[str, Path]:
    """Every package module in a role folder or a sub-package of one, as ``"folder.module"`` or
    ``"folder.package.module"``; a deprecated path (a shim of :mod:`introspection_utils.core.deprecation`) is not
    one."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in sorted(PACKAGE.glob("*/**/*.py"))
            if p.stem != "__init__" and not _is_shim(p)}


def _is_shim(path: Path) -> bool:
    """A deprecated import path kept one release: it only forwards names to their new home."""
    return "__getattr__ = moved(" in path.read_text(encoding="utf-8")


def _package_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (``"folder.module"``, ``"folder.package.module"``, or ``"folder"`` for the
    folder itself), outside ``if TYPE_CHECKING:`` blocks."""
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
            base = node.module.removeprefix("introspection_utils.")
            found |= {base} | {f"{base}.{a.name}" for a in node.names}  # a name may be a submodule
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("introspection_utils.") for a in node.names
                      if a.name.startswith("introspection_utils.")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _package_imports(path) & set(modules) - {name} for name, path in modules.items()}


def test_every_module_lives_in_a_role_folder():
    folders = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    nested = {p.parent.relative_to(PACKAGE).parts[0] for p in PACKAGE.glob("*/*/__init__.py")}
    assert nested <= set(FOLDERS), f"sub-packages outside a role folder: {nested - set(FOLDERS)}"
    assert folders == set(FOLDERS), f"folders {sorted(folders)} differ from FOLDERS {sorted(FOLDERS)}"
    loose = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert loose == set(ENTRY_POINTS), f"top-level modules that are not entry points: {loose - set(ENTRY_POINTS)}"


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_imports_only_from_its_folder_or_below(module):
    rank = FOLDERS[module.split(".")[0]]
    imported = _graph()[module]
    upward = sorted(m for m in imported if m.split(".")[0] != module.split(".")[0]
                    and FOLDERS[m.split(".")[0]] >= rank)
    assert not upward, f"{module} (rank {rank}) imports {[(m, FOLDERS[m.split('.')[0]]) for m in upward]}"


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_points_only_run_their_command(name):
    text = (PACKAGE / f"{name}.py").read_text(encoding="utf-8")
    assert f'runpy.run_module("introspection_utils.{ENTRY_POINTS[name]}", run_name="__main__"' in text
    assert (PACKAGE / Path(*ENTRY_POINTS[name].split("."))).with_suffix(".py").is_file()
    assert not _package_imports(PACKAGE / f"{name}.py"), f"{name}.py imports package code; it should only run it"


def test_every_experiment_module_serves_a_registry_entry():
    """``experiments/`` holds experiments: each module is named by an entry of the experiment registry
    (``apps/catalog.py``) or imported, directly or not, by one that is (``attribution`` by ``mechanisms``)."""
    from introspection_utils.apps.catalog import EXPERIMENTS

    graph = _graph()
    named = {m for e in EXPERIMENTS for m in e.module_names}
    unknown = sorted(named - set(graph))
    assert not unknown, f"registry entries name modules that do not exist: {unknown}"
    served, todo = set(), sorted(named)
    while todo:
        module = todo.pop()
        if module not in served:
            served.add(module)
            todo += sorted(graph[module])
    orphans = sorted(m for m in graph if m.startswith("experiments.") and m not in served)
    assert not orphans, f"experiments/ modules no registry entry uses: {orphans} (add them to an entry's modules)"


def _length_problem(text: str) -> str | None:
    """Why a module's text breaks the length rule, or ``None``: up to MAX_LINES lines is fine; up to HARD_LINES
    with a reason in its docstring ("over 400 lines because ..."); longer never."""
    lines = len(text.splitlines())
    if lines > HARD_LINES:
        return f"{lines} lines (> {HARD_LINES}): split it by role"
    if lines > MAX_LINES and not LONG_REASON.search(ast.get_docstring(ast.parse(text)) or ""):
        return f"{lines} lines (> {MAX_LINES}) and no reason at its top: split it, or say \"over 400 lines because\""
    return None


@pytest.mark.parametrize("module", sorted(_modules()))
def test_a_module_over_400_lines_says_why_at_its_top(module):
    if module in REASON_FROM_ANOTHER_BRANCH:
        pytest.skip(f"its reason comes from {REASON_FROM_ANOTHER_BRANCH[module]}")
    problem = _length_problem(_modules()[module].read_text(encoding="utf-8"))
    assert problem is None, f"{module}: {problem}"


def test_the_length_rule_reads_the_reason_and_caps_at_500():
    short, body = '"""A module."""\n', "x = 1\n" * 420
    assert _length_problem(short + "x = 1\n" * 10) is None
    assert "no reason at its top" in _length_problem(short + body)
    assert _length_problem('"""A module, over 400 lines because its one table is long."""\n' + body) is None
    assert "split it by role" in _length_problem('"""Over 400 lines because reasons."""\n' + "x = 1\n" * 520)
    stale = [m for m in REASON_FROM_ANOTHER_BRANCH
             if m not in _modules() or _length_problem(_modules()[m].read_text(encoding="utf-8")) is None]
    assert not stale, f"these modules meet the rule now; remove them from REASON_FROM_ANOTHER_BRANCH: {stale}"
