"""Print pyproject.toml's direct dependencies pinned at their declared lower bounds.

`.ci/run` hands the output to ``uv pip install --constraint``, so its second venv has every
direct dependency (runtime and [dev]) exactly at its floor, and the fast tests prove the
floors true. ``--resolution lowest-direct`` alone is not exact: it lets a transitive
requirement lift a direct one (the newest scipy asks numpy>=1.26.4, above our numpy>=1.24),
and it silently picks the next release when the floor names none (timm 1.0 -> 1.0.3).

    python scripts/lower_bounds.py > lowest.txt   # e.g. torch==2.3
"""

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pins(pyproject: Path = PYPROJECT) -> list[str]:
    """``name==floor`` for every runtime and optional dependency declared as ``name>=floor``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    out = []
    for requirement in [*project["dependencies"], *(r for extra in extras for r in extra)]:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9.]*)\s*", requirement)
        if m is None:
            raise SystemExit(f"{pyproject}: {requirement!r} is not 'name>=version' (one floor)")
        out.append(f"{m.group(1)}=={m.group(2)}")
    return out


if __name__ == "__main__":
    print("\n".join(pins()))
