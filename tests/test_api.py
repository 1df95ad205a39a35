"""The curated public API: ``introspection_utils.__all__`` names what a user touches; each name is the object its
home module defines, and importing the package stays cheap (nothing is loaded until a name is used)."""

from __future__ import annotations

import importlib
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
