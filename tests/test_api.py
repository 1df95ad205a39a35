"""The curated public API: ``introspection_utils.__all__`` names what a user touches; each name is the object its
home module defines, and importing the package stays cheap (nothing is loaded until a name is used)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

import introspection_utils


@pytest.mark.parametrize("name", introspection_utils.__all__)
def test_public_name_is_its_home_modules_object(name):
    home = importlib.import_module(f"introspection_utils.{introspection_utils._HOMES[name]}")
    assert getattr(introspection_utils, name) is getattr(home, name)
    assert name in dir(introspection_utils)


def test_all_is_the_table_of_homes():
    assert sorted(introspection_utils.__all__) == sorted(introspection_utils._HOMES)


def test_unknown_name_says_what_is_public():
    with pytest.raises(AttributeError, match="load_model"):
        introspection_utils.no_such_name  # noqa: B018


def test_importing_the_package_loads_no_torch():
    code = "import sys, introspection_utils\nassert 'torch' not in sys.modules, sorted(sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.integration
def test_the_readme_example_runs_as_a_script_and_prints_its_numbers(tmp_path):
    """The README's "Using it" block, saved as a file and run (what a new user does first): it needs no file the
    user does not have, and it prints the readouts."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    code = readme.split("## Using it", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("yes − no, injected:") and lines[1].startswith("yes − no, not injected:")
    assert lines[2] == "logit lens: (3, 30)" and lines[3].startswith("your direction: [")
