"""Project-level consistency: conda and pip name the same dependencies; the README's commands."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
#: conda package names that differ from their PyPI names
CONDA_TO_PYPI = {"pytorch": "torch"}


def _name_and_spec(requirement: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement)
    assert m, requirement
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def _environment_yml() -> tuple[dict[str, str], dict[str, str]]:
    """(conda dependencies, pip dependencies) of environment.yml, parsed without a YAML library."""
    conda, pip, in_pip = {}, {}, False
    text = (REPO / "environment.yml").read_text()
    for line in text[text.index("dependencies:") :].splitlines()[1:]:
        if line.strip().startswith("#") or not line.strip():
            continue
        if re.match(r"^\s{2}- pip:\s*$", line):
            in_pip = True
            continue
        m = re.match(r"^(\s*)- (.+)$", line)
        if not m:
            continue
        item = m.group(2).strip()
        if in_pip and len(m.group(1)) > 2:
            if not item.startswith("-e"):
                name, spec = _name_and_spec(item)
                pip[name] = spec
        else:
            in_pip = False
            name, spec = _name_and_spec(item)
            if name not in ("python", "pip"):
                conda[CONDA_TO_PYPI.get(name, name)] = spec
    return conda, pip


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_environment_yml_matches_pyproject_dependencies() -> None:
    project = _pyproject()["project"]
    runtime = dict(_name_and_spec(r) for r in project["dependencies"])
    dev = dict(_name_and_spec(r) for r in project["optional-dependencies"]["dev"])
    conda, pip = _environment_yml()
    assert conda == runtime, "environment.yml's conda dependencies differ from pyproject's dependencies"
    assert pip == dev, "environment.yml's pip dependencies differ from pyproject's [dev] extra"


def test_environment_yml_installs_the_package_editable() -> None:
    assert "- -e .[dev]" in (REPO / "environment.yml").read_text()


def test_torch_is_a_range_not_a_pin() -> None:
    deps = dict(_name_and_spec(r) for r in _pyproject()["project"]["dependencies"])
    assert deps["torch"].startswith(">=") and "==" not in deps["torch"]


def test_readme_commands_and_ci_agree() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]" && python -m dino_nb.train' in readme
    assert "\npytest\n" in readme
    assert 'pip install -q -e ".[dev]"' in ci and "python -m dino_nb.train" in ci
    assert re.search(r"^pytest\b", ci, re.M)


def test_pytest_collects_tests_and_notebooks_in_strict_nbval() -> None:
    options = _pyproject()["tool"]["pytest"]["ini_options"]
    assert options["testpaths"] == ["tests", "notebooks"]
    assert "--nbval " in options["addopts"] + " " and "--nbval-lax" not in options["addopts"]
    assert "--nbval-current-env" in options["addopts"]
