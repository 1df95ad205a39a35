"""Numbers from runs are written by commands into generated blocks (``<!-- name:start -->`` … ``<!-- name:end -->``),
never typed: the kinds of measured number that were once typed into the docs, notebooks' markdown and docstrings do
not come back outside a block, and the blocks written together by one command agree."""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from pathlib import Path

import pytest

from introspection_utils.core.paths import read_block

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- (\S+):start -->.*?<!-- \1:end -->", re.S)

# Each pattern matches only what a run produces (a measurement's date, a correlation's value, a rate, a load average,
# a duration stated as measured); none matches a definition, a default, a threshold or a budget ("80% power",
# "R² says", "its 30 s deadline", "well under 30 min", "engine ≥ 8× naive"): the test below holds both sides.
MEASURED = {
    "a measurement's date": r"\b[Mm]easured (?:on )?20\d\d-\d\d-\d\d",
    "a correlation's value": r"(?:\bPearson r|\bSpearman ρ|\br|ρ|R²)\s*=\s*[+−-]?\d*\.\d",
    "a rate": r"\d[\d.,]*\s*(?:trials|examples|tokens)/s\b",
    "a load average": r"\bload average (?:of )?\d",
    "an approximate duration": r"~\s*\d+(?:\.\d+)?\s*(?:ms|s|min|minutes|h|hours?)\b",
    "a duration something took": r"\btook\s+~?\d+(?:\.\d+)?\s*(?:ms|s|min|minutes|h|hours?)\b",
    "CPU or wall time": r"\d+(?:\.\d+)?\s*(?:s|min) (?:of CPU|wall)\b",
}


def measured_numbers(text: str) -> list[str]:
    """``kind: …context…`` for every measured-looking number in ``text`` outside its generated blocks."""
    text = BLOCK.sub("", text)
    return [f"{kind}: …{text[max(0, m.start() - 50):m.end() + 20]}…".replace("\n", " ")
            for kind, pattern in MEASURED.items() for m in re.finditer(pattern, text)]


def _python_prose(path: Path) -> str:
    """A module's docstrings (module, classes, functions) and comments."""
    source = path.read_text(encoding="utf-8")
    nodes = [n for n in ast.walk(ast.parse(source))
             if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    docstrings = [ast.get_docstring(n, clean=False) or "" for n in nodes]
    comments = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    return "\n".join(docstrings + comments)


def _notebook_markdown(path: Path) -> str:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


PROSE = {  # where typed numbers would be read: each file's prose, by kind
    "README.md and docs/*.md": lambda: {p: p.read_text(encoding="utf-8")
                                         for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]},
    "the notebooks' markdown": lambda: {p: _notebook_markdown(p) for p in sorted((ROOT / "notebooks").glob("*.ipynb"))},
    "the package's docstrings and comments": lambda: {p: _python_prose(p)
                                                      for p in sorted((ROOT / "introspection_utils").rglob("*.py"))},
}


def test_the_patterns_catch_measured_numbers_and_spare_definitions():
    for typed in ["Pearson r = 0.985, Spearman ρ = 0.997", "at 354 trials/s in bf16", "come from the cache (~0.1 s)",
                  "measured 2026-11-25", "at load average 8", "took 31.5 s here", "47 s of CPU (3 min wall"]:
        assert measured_numbers(typed), typed
    for definition in ["found with 80% power at α = 0.05", "R² says how much of the spread", "within its 30 s deadline",
                       "suite well under 30 min", "engine ≥ 8× naive, ≥ 50% of the linear peak", "the controls' R²",
                       "`--cell-timeout SECONDS` (default 1800)", "trials/s both ways",
                       "<!-- bench:start -->\n| engine | 4.1 trials/s |, load average 7.68\n<!-- bench:end -->"]:
        assert not measured_numbers(definition), definition


@pytest.mark.parametrize("where", sorted(PROSE))
def test_no_measured_number_is_typed_outside_a_generated_block(where):
    """A number from a run, typed by hand, goes stale the day the run changes: it is a generated block (written by
    `python -m introspection_utils.findings`, `run --write-times`, the bench, …) or it is not there."""
    found = [f"{path.relative_to(ROOT)}: {hit}" for path, text in PROSE[where]().items()
             for hit in measured_numbers(text)]
    assert not found, f"measured numbers typed outside a generated block in {where}:\n" + "\n".join(found)


def test_the_readmes_demo_time_is_the_one_in_the_notebook_guides_timings():
    """`run --write-times docs/notebooks.md README.md` writes both from one series.json: they change together."""
    timings = read_block(ROOT / "docs" / "notebooks.md", "timings")
    assert read_block(ROOT / "README.md", "demo_time") in timings.split("\n\n")


def test_the_timings_table_times_every_notebook_of_the_series():
    """A notebook added (or renamed) since the last `make demo` leaves the timings table stale."""
    timings = read_block(ROOT / "docs" / "notebooks.md", "timings")
    timed = re.findall(r"^\| `(\d\d_\w+\.ipynb)` \|", timings, re.M)
    assert timed == sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")), \
        "run `make demo`, then `.venv/bin/python -m introspection_utils.run --write-times docs/notebooks.md README.md`"
