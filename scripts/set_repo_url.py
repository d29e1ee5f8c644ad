"""Write the repository's URL everywhere it appears, from one place: ``pyproject.toml``.

``[project.urls] Repository`` holds the URL. This script sets it (when given one) and then
rewrites every place derived from it:

* each notebook's first code cell (``REPO = "..."``, what ``%pip install git+REPO`` uses);
* each notebook's "Open in Colab" and "Open in Kaggle" badges (added under the title when
  missing);
* the README's Colab link and ``pip install git+...`` lines.

Usage, from anywhere::

    python scripts/set_repo_url.py https://github.com/me/dino-nb   # a fork
    python scripts/set_repo_url.py                                  # re-apply pyproject's URL
    python scripts/set_repo_url.py --check                          # exit 1 if anything is stale

Notebooks keep their outputs (only cell sources change), so strict nbval stays green without
regenerating them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
README = ROOT / "README.md"
NOTEBOOKS = ROOT / "notebooks"
#: What the files held before the URL lived in pyproject.toml.
PLACEHOLDER = "https://github.com/<you>/dino-nb"
URL_LINE = re.compile(r'^(Repository\s*=\s*)"([^"]*)"', re.M)
GITHUB = re.compile(r"^https://github\.com/([\w.-]+)/([\w.-]+?)/?$")
REPO_LINE = re.compile(r'^REPO = "[^"]*"', re.M)
BADGE_MARK = "colab-badge.svg"


def read_url(pyproject: Path = PYPROJECT) -> str:
    """The ``Repository`` URL under ``[project.urls]``."""
    match = URL_LINE.search(pyproject.read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f'{pyproject} has no Repository = "..." line under [project.urls]')
    return match.group(2)


def owner_name(url: str) -> str:
    """``owner/name`` of a GitHub URL (Colab and Kaggle open notebooks from GitHub only)."""
    match = GITHUB.match(url)
    if match is None:
        raise ValueError(f"need a https://github.com/<owner>/<name> URL, got {url!r}")
    return f"{match.group(1)}/{match.group(2)}"


def badges(url: str, notebook: str) -> str:
    """Markdown for the two "open in" badges of one notebook."""
    path = f"{owner_name(url)}/blob/main/notebooks/{notebook}"
    colab = f"https://colab.research.google.com/github/{path}"
    kaggle = f"https://kaggle.com/kernels/welcome?src=https://github.com/{path}"
    return (
        f"[![Open In Colab](https://colab.research.google.com/assets/{BADGE_MARK})]({colab}) "
        f"[![Open In Kaggle](https://kaggle.com/static/images/open-in-kaggle.svg)]({kaggle})"
    )


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _set_source(cell: dict, text: str) -> None:
    lines = text.splitlines(keepends=True)
    cell["source"] = lines


def rewrite_notebook(nb: dict, name: str, url: str) -> dict:
    """The notebook with its ``REPO`` line and badges set to ``url`` (outputs untouched)."""
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    src = _source(code)
    if not REPO_LINE.search(src):
        raise ValueError(f'{name}: the first code cell has no REPO = "..." line')
    _set_source(code, REPO_LINE.sub(f'REPO = "{url}"', src, count=1))
    first = nb["cells"][0]
    lines = _source(first).split("\n")
    badge = badges(url, name)
    kept = [line for line in lines if BADGE_MARK not in line]
    rest = kept[1:]
    while rest and not rest[0].strip():
        rest = rest[1:]
    # the title, then the badges (replacing any old ones), then the text
    _set_source(first, "\n".join([kept[0], "", badge, "", *rest]))
    return nb


def rewrite_readme(text: str, old_urls: list[str], url: str) -> str:
    """The README with every old URL (and its Colab form) replaced by ``url``'s."""
    for old in old_urls:
        if old == url:
            continue
        old_path = old.removeprefix("https://github.com/")
        text = text.replace(
            f"colab.research.google.com/github/{old_path}/",
            f"colab.research.google.com/github/{owner_name(url)}/",
        )
        text = text.replace(old, url)
    return text


def main(argv: list[str] | None = None) -> int:
    """Set the URL (optional), rewrite the notebooks and the README, or check them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", help="the new URL (default: pyproject.toml's)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    old = read_url()
    url = (args.url or old).rstrip("/")
    owner_name(url)  # a GitHub URL, or a clear error
    changes: dict[Path, str] = {}
    if url != old:
        changes[PYPROJECT] = URL_LINE.sub(
            rf'\g<1>"{url}"', PYPROJECT.read_text(encoding="utf-8"), count=1
        )
    for path in sorted(NOTEBOOKS.glob("[0-9]*.ipynb")):
        before = path.read_text(encoding="utf-8")
        nb = rewrite_notebook(json.loads(before), path.name, url)
        changes[path] = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    changes[README] = rewrite_readme(README.read_text(encoding="utf-8"), [PLACEHOLDER, old], url)
    stale = [p for p, text in changes.items() if p.read_text(encoding="utf-8") != text]
    for path in stale:
        print(f"{'stale' if args.check else 'updated'}: {path.relative_to(ROOT)}")
        if not args.check:
            path.write_text(changes[path], encoding="utf-8")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
