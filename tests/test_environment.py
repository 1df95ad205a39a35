"""environment.yml (conda users) and pyproject.toml (pip users) list the same packages with the same specifiers."""

from __future__ import annotations

from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _requirements(lines) -> dict[str, str]:
    """``{canonical name: "specifier; marker"}``, normalised so that spelling and order don't matter."""
    out = {}
    for line in lines:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name not in out, f"{req.name} is listed twice"
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        out[name] = f"{extras}{','.join(sorted(str(s) for s in req.specifier))}" + (
            f"; {req.marker}" if req.marker else "")
    return out


def _conda_pip_list() -> list[str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict) and "pip" in dep]
    assert len(pip) == 1, "environment.yml needs exactly one pip: section"
    return [line for line in pip[0] if not line.startswith("-e")]  # "-e ." installs the package itself


def test_environment_yml_and_pyproject_list_the_same_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    pyproject = _requirements([*project["dependencies"], *(req for extra in extras.values() for req in extra)])
    conda = _requirements(_conda_pip_list())
    only_pyproject = {n: s for n, s in pyproject.items() if n not in conda}
    only_conda = {n: s for n, s in conda.items() if n not in pyproject}
    different = {n: (pyproject[n], conda[n]) for n in pyproject.keys() & conda.keys() if pyproject[n] != conda[n]}
    assert not (only_pyproject or only_conda or different), (
        f"environment.yml and pyproject.toml disagree:\n  only in pyproject.toml: {only_pyproject}\n"
        f"  only in environment.yml: {only_conda}\n  different (pyproject, environment.yml): {different}")


def test_environment_yml_installs_the_package_itself():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(dep["pip"] for dep in env["dependencies"] if isinstance(dep, dict))
    assert "-e ." in pip
