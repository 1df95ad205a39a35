"""The experiment registry (``core/registry.py``; the series' entries in ``apps/catalog.py``) is the series: one
entry per notebook and one notebook per entry, each entry holding the modules and functions its notebook really
calls, and naming what it draws and saves (read from the notebook's code); the runner's list, the notebook guide's
table and the findings all read it, and it refuses a duplicate."""

from __future__ import annotations

import ast
import re
from fnmatch import fnmatchcase
from importlib import import_module
from pathlib import Path

import nbformat
import pytest

from introspection_utils.apps import findings, run
from introspection_utils.apps.catalog import EXPERIMENTS
from introspection_utils.core.data import tomllib
from introspection_utils.core.paths import read_block
from introspection_utils.core.registry import Experiment, Registry, pattern

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "introspection_utils"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
FINDINGS_FILES = [ROOT / "data" / "findings" / "qwen2.5-coder-1.5b-instruct.toml",
                  ROOT / "tests" / "tiny_findings.toml"]
READING_CALL = re.compile(r"^(describe\w*|reading|summary|contrast)$")  # how the series names its sentence makers


def _code(stem: str) -> list[ast.Module]:
    nb = nbformat.read(ROOT / "notebooks" / f"{stem}.ipynb", as_version=4)
    return [ast.parse(c.source) for c in nb.cells if c.cell_type == "code"]


def _aliases(trees: list[ast.Module]) -> dict[str, str]:
    """Names a notebook binds to package modules or functions -> ``"folder.module"`` / ``"folder.module.name"``."""
    out = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("introspection_utils."):
                base = node.module.removeprefix("introspection_utils.")
                out |= {a.asname or a.name: f"{base}.{a.name}" for a in node.names}
    return out


def _resolve(name: str):
    """The function a notebook's ``"folder.module.function"`` denotes (a re-export is the same object)."""
    module, _, attribute = name.rpartition(".")
    return getattr(import_module(f"introspection_utils.{module}"), attribute)


def _name(node: ast.expr) -> str | None:
    """A name argument as written: a string, or an f-string with each formatted part as ``{}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _calls(trees: list[ast.Module]) -> list[ast.Call]:
    return [n for tree in trees for n in ast.walk(tree) if isinstance(n, ast.Call)]


def _attribute_calls(trees: list[ast.Module]) -> set[tuple[str, str]]:
    return {(c.func.value.id, c.func.attr) for c in _calls(trees)
            if isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name)}


def test_every_notebook_has_exactly_one_entry_and_every_entry_a_notebook():
    stems = [e.notebook for e in EXPERIMENTS]
    assert len(stems) == len(set(stems)), f"entries named twice: {sorted({s for s in stems if stems.count(s) > 1})}"
    assert len({e.number for e in EXPERIMENTS}) == len(EXPERIMENTS), "two entries share a number"
    assert stems == [p.stem for p in NOTEBOOKS], "the registry and notebooks/ differ (or are in another order)"


@pytest.mark.parametrize("entry", EXPERIMENTS, ids=lambda e: e.number)
def test_entry_figures_are_what_the_notebook_saves(entry):
    saved = [c.args[2] for c in _calls(_code(entry.notebook))
             if isinstance(c.func, ast.Attribute) and c.func.attr == "save_notebook_figure" and len(c.args) >= 3]
    names = [_name(a) for a in saved]
    assert None not in names, f"{entry.notebook}: a save_figure name that is neither a string nor an f-string"
    assert len(names) == len(entry.figures), f"{entry.notebook} saves {names}, its entry says {entry.figures}"
    for name in names:  # an f-string part ({}) stands for whatever the entry's {part} is filled with
        matching = [f for f in entry.figures if fnmatchcase(pattern(f).replace("*", "x"), pattern(name))]
        assert len(matching) == 1, f"{entry.notebook} saves {name!r}; its entry's figures {entry.figures}"


def _is_module(name: str) -> bool:
    return (PACKAGE / Path(*name.split("."))).with_suffix(".py").is_file()


@pytest.mark.parametrize("entry", EXPERIMENTS, ids=lambda e: e.number)
def test_entry_modules_are_what_the_notebook_calls(entry):
    """Every ``experiments/`` module the notebook imports is in the entry, and every module of the entry is
    imported by the notebook (for 00 and 01, the engine modules that compute)."""
    names = set(_aliases(_code(entry.notebook)).values())  # modules, and names imported from modules
    imported = {v if _is_module(v) else v.rsplit(".", 1)[0] for v in names} | names
    assert {m for m in imported if m.startswith("experiments.") and _is_module(m)} == \
        {m for m in entry.module_names if m.startswith("experiments.")}
    assert set(entry.module_names) <= imported, f"{entry.notebook} does not import {set(entry.module_names) - imported}"


@pytest.mark.parametrize("entry", EXPERIMENTS, ids=lambda e: e.number)
def test_entry_readings_are_the_functions_the_notebook_prints_with(entry):
    trees = _code(entry.notebook)
    aliases = _aliases(trees)
    called = {f"{aliases[alias]}.{attr}" for alias, attr in _attribute_calls(trees)
              if alias in aliases and READING_CALL.match(attr)}
    called |= {aliases[c.func.id] for c in _calls(trees) if isinstance(c.func, ast.Name) and c.func.id in aliases
               and READING_CALL.match(c.func.id)}
    assert {_resolve(name) for name in called} == set(entry.readings)


@pytest.mark.parametrize("entry", EXPERIMENTS, ids=lambda e: e.number)
def test_entry_tables_are_the_tables_the_notebook_saves(entry):
    """Every table name written in the notebook (``name=...`` of a run, ``save_table``'s name) is in the entry; an
    entry table the notebook does not name is named by one of the entry's modules (its fixed words are there)."""
    calls = _calls(_code(entry.notebook))
    written = {_name(k.value) for c in calls for k in c.keywords if k.arg == "name"}
    written |= {_name(c.args[3]) for c in calls if isinstance(c.func, ast.Name) and c.func.id == "save_table"}
    written.discard(None)
    assert written <= set(entry.tables), f"{entry.notebook} saves {written - set(entry.tables)} not in its entry"
    files = [p for m in entry.modules for p in (sorted(Path(m.__file__).parent.glob("*.py"))
                                                 if Path(m.__file__).name == "__init__.py" else [Path(m.__file__)])]
    sources = "".join(p.read_text() for p in files)
    for table in set(entry.tables) - written:
        words = [w for w in re.split(r"\{[^{}]*\}", table) if w]
        assert words and all(w in sources for w in words), f"{entry.notebook}: table {table!r} is saved by nothing"


@pytest.mark.parametrize("entry", EXPERIMENTS, ids=lambda e: e.number)
def test_every_findings_file_has_the_entry_parameter_table(entry):
    for path in FINDINGS_FILES:
        assert entry.findings_table in tomllib.loads(path.read_text()), f"{path.name} lacks [{entry.findings_table!r}]"


def test_findings_readers_are_the_registry_and_read_nothing_from_an_empty_folder(tmp_path):
    with_reader = [e for e in EXPERIMENTS if e.findings]
    assert list(findings.SERIES) == [e.number for e in with_reader]
    for e in with_reader:
        title, read = findings.SERIES[e.number]
        assert title == e.title and read is e.findings and read(tmp_path) == []


def test_the_notebook_guide_table_is_the_registry():
    """docs/notebooks.md's table is what `run --write-guide docs/notebooks.md` writes now."""
    doc = ROOT / "docs" / "notebooks.md"
    assert read_block(doc, "notebooks") == run.guide_markdown(doc), \
        "run `.venv/bin/python -m introspection_utils.run --write-guide docs/notebooks.md`"


def test_run_list_prints_every_entry(capsys):
    assert run.main(["--list"]) == 0
    out = capsys.readouterr().out
    for e in EXPERIMENTS:
        block = out.split(f"{e.notebook} · {e.title}\n")[1].split("\n\n")[0]
        assert all(f in block for f in e.figures) and all(m in block for m in e.module_names)
        assert all(r in block for r in e.reading_names)


def test_an_entry_is_checked_when_it_is_made():
    from introspection_utils.experiments import sweeps
    from introspection_utils.readings import saved, sentences

    fields = dict(title="t", question="q", modules=(sweeps,), figures=("99_x",), tables=(), alt="a",
                  readings=(sentences.describe_scale_sweep,), findings=saved.scale_sweep_sentences)
    with pytest.raises(ValueError, match="guide_figure '99_y' is none of its figures"):
        Experiment("99_new", guide_figure="99_y", **fields)
    with pytest.raises(ValueError, match="file's stem"):
        Experiment("new", guide_figure="99_x", **fields)
    with pytest.raises(TypeError, match="the package's modules themselves, not 'experiments.sweeps'"):
        Experiment("99_new", guide_figure="99_x", **{**fields, "modules": ("experiments.sweeps",)})
    with pytest.raises(TypeError, match="hold functions, not 'readings.saved.scale_sweep_sentences'"):
        Experiment("99_new", guide_figure="99_x", **{**fields, "findings": "readings.saved.scale_sweep_sentences"})
    with pytest.raises(KeyError, match="no experiment '99'"):
        EXPERIMENTS.by_number("99")


def test_the_registry_refuses_a_second_entry_for_a_number_or_a_notebook():
    from introspection_utils.experiments import sweeps

    fields = dict(title="t", question="q", modules=(sweeps,), figures=("99_x",), tables=(), readings=(), alt="a",
                  guide_figure="99_x")
    registry = Registry((Experiment("99_new", **fields),))
    with pytest.raises(ValueError, match="'99_other' is registered already \\(as '99_new', number 99\\)"):
        registry.register(Experiment("99_other", **fields))
    with pytest.raises(ValueError, match="registered already"):
        Registry((EXPERIMENTS.by_number("02"), EXPERIMENTS.by_number("02")))
    assert [e.notebook for e in registry] == ["99_new"] and len(registry) == 1  # the refused entry left no trace
