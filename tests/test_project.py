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
#: conda-forge package names that differ from their PyPI names (the -gpu/-cpu metapackages
#: pick a build of the same PyTorch)
CONDA_TO_PYPI = {"pytorch": "torch", "pytorch-gpu": "torch", "pytorch-cpu": "torch"}


def _name_and_spec(requirement: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", requirement)
    assert m, requirement
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def _lower_bound(spec: str) -> tuple[int, ...]:
    """``(2, 1)`` for ``">=2.1"``: the only specifier either file should need."""
    m = re.fullmatch(r">=(\d+(?:\.\d+)*)", spec)
    assert m, f"expected a lower bound like '>=2.1', got {spec!r}"
    return tuple(int(p) for p in m.group(1).split("."))


def _environment_yml() -> tuple[list[str], dict[str, str], list[str]]:
    """(channels, conda dependencies by PyPI name, pip lines) of environment.yml, without a YAML library."""
    channels, conda, pip, section = [], {}, [], None
    for line in (REPO / "environment.yml").read_text().splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        if not line.startswith(" "):  # a top-level key
            section = line.split(":")[0]
            continue
        m = re.match(r"^(\s*)- (.+?)\s*$", line)
        assert m, f"unexpected line in environment.yml: {line!r}"
        indent, item = len(m.group(1)), m.group(2)
        if section == "channels":
            channels.append(item)
        elif item == "pip:":
            section = "pip"
        elif section == "pip" and indent > 2:
            pip.append(item)
        else:
            section = "dependencies"
            name, spec = _name_and_spec(item)
            if name not in ("python", "pip"):
                assert CONDA_TO_PYPI.get(name, name) not in conda, f"{name} listed twice"
                conda[CONDA_TO_PYPI.get(name, name)] = spec
    return channels, conda, pip


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_environment_yml_uses_conda_forge_alone() -> None:
    # PyTorch's own channel stopped at 2.5 (pytorch/pytorch#138506); conda-forge builds it
    channels, _, _ = _environment_yml()
    assert channels == ["conda-forge"]


def test_environment_yml_has_every_runtime_dependency_from_conda_forge() -> None:
    runtime = dict(_name_and_spec(r) for r in _pyproject()["project"]["dependencies"])
    _, conda, _ = _environment_yml()
    assert conda.keys() == runtime.keys(), "conda packages differ from pyproject's dependencies"
    for name, spec in runtime.items():
        # conda may ask for more than pip, never less: pip would then replace conda's build
        assert _lower_bound(conda[name]) >= _lower_bound(spec), (name, conda[name], spec)


def test_environment_yml_installs_the_package_with_pip_alone() -> None:
    # the [dev] extra comes from pyproject.toml, not from a second list that could drift
    _, _, pip = _environment_yml()
    assert pip == ["-e .[dev]"]


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


def _lower_bounds_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lower_bounds", REPO / "scripts" / "lower_bounds.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lower_bounds_pins_every_direct_dependency_at_its_floor() -> None:
    # .ci/run installs these as constraints: a dependency left out would go untested
    project = _pyproject()["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    pinned = dict(line.split("==") for line in _lower_bounds_script().pins())
    assert len(pinned) == len(declared)
    for requirement in declared:
        name, spec = _name_and_spec(requirement)
        assert tuple(int(p) for p in pinned[name].split(".")) == _lower_bound(spec), name


@pytest.mark.parametrize("requirement", ["torch", "torch>=2.3,<3", "torch==2.3", "torch>2.3"])
def test_lower_bounds_refuses_a_dependency_without_one_floor(tmp_path, requirement) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\ndependencies = ["numpy>=1.24", "{requirement}"]\n')
    with pytest.raises(SystemExit, match=re.escape(repr(requirement))):
        _lower_bounds_script().pins(pyproject)


def test_ci_tests_at_the_lower_bounds() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/lower_bounds.py" in ci and "--resolution lowest-direct" in ci
    assert re.search(r'-m "not slow" tests/', ci)
