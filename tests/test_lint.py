"""`ruff check .` is part of the test run: the package, the tests and the notebooks stay lint-clean."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str] | None:
    beside = Path(sys.executable).parent / "ruff"  # the venv's ruff (a test extra), else one on PATH
    found = str(beside) if beside.exists() else shutil.which("ruff")
    return [found] if found else None


@pytest.mark.skipif(_ruff() is None, reason="ruff not installed (it is in the test extra: pip install -e '.[test]')")
def test_ruff_check_is_clean_including_notebooks():
    proc = subprocess.run([*_ruff(), "check", ".", "--output-format", "concise"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checked = subprocess.run([*_ruff(), "check", ".", "--show-files"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120).stdout
    assert "00_quickstart.ipynb" in checked, "ruff must check the notebooks too"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_no_tracked_file_is_one_git_ignores():
    """Resume chunks, caches and run outputs are ignored; one committed by mistake would ship stale state."""
    proc = subprocess.run(["git", "ls-files", "--cached", "--ignored", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
