"""The package's shape: public names, one-way imports, a thin core (scripts/package_map.py)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import dino_nb
from dino_nb import loader

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("package_map", ROOT / "scripts" / "package_map.py")
package_map = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package_map)

#: The layout's limits (the thin-package issue): the core modules at the top of dino_nb/, lines as
#: ``wc -l`` counts them, functions in the core.
MAX_CORE_MODULES = 14
MAX_MODULE_LINES = 500
MAX_CORE_FUNCTION_LINES = 60
MAX_FUNCTION_LINES = 80


@pytest.mark.parametrize("name", dino_nb.__all__)
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(dino_nb, name) is not None


def test_the_fast_pipelines_are_registered_by_importing_the_package() -> None:
    assert set(loader.CROP_PIPELINES) == {"cache", "gpu"}


def test_no_import_cycle_counting_imports_inside_functions() -> None:
    assert package_map.cycles(package_map.graph()) == []


def test_the_core_never_imports_a_subpackage() -> None:
    assert package_map.upward_imports(package_map.graph()) == []


def test_cycle_finder_finds_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert package_map.cycles(edges) == [["a", "b", "c"]]


def test_module_and_function_sizes() -> None:
    mods = package_map.modules()
    core = [name for name in mods if package_map.part_of(name) == "core"]
    assert len(core) <= MAX_CORE_MODULES, sorted(core)
    too_long = {
        name: n
        for name, path in mods.items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long
    for name, path in mods.items():
        limit = (
            MAX_CORE_FUNCTION_LINES if package_map.part_of(name) == "core" else MAX_FUNCTION_LINES
        )
        long_functions = [(n, f) for n, f in package_map.functions(path) if n > limit]
        assert not long_functions, (name, long_functions)


@pytest.mark.parametrize("entry", ["data", "evaluate", "embed", "train"])
def test_python_m_entry_points_still_answer(entry: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"dino_nb.{entry}", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert f"python -m dino_nb.{entry}" in done.stdout
    assert "RuntimeWarning" not in done.stderr  # runpy: the module was imported before running


def test_the_map_prints_every_part() -> None:
    text = package_map.report()
    for part in ("core:", "notebook:", "fast:", "tools:", "import cycles: none"):
        assert part in text
