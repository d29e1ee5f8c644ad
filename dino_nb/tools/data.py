"""``python -m dino_nb.data``: find ImageNette on this machine or download it; prints its folder."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..sources import default_data_dir, find_imagenette
from .cli import option, run_program


@dataclass(kw_only=True)
class DataOptions:
    """The options of ``python -m dino_nb.data``: ``--find [PATH]`` or ``--download SIZE``."""

    find: str | None = option(
        None,
        "find ImageNette (below PATH, or in the usual places)",
        one_of="action",
        nargs="?",
        const="",
        metavar="PATH",
    )
    download: Literal["320px", "160px", "full"] | None = option(
        None, "download 320px, 160px or full", one_of="action", metavar="SIZE"
    )
    root: str | None = option(None, "folder to download into (none: $DINO_NB_DATA or data/)")
    url: str | None = option(None, "download from this address instead (a mirror)")
    md5: str | None = option(None, "expected md5 of the archive at --url")
    keep_archive: bool = option(False, "keep the .tgz after extracting it")


def _data(opts: DataOptions) -> int:
    if opts.download is not None:
        from .download import download_imagenette

        root = opts.root if opts.root is not None else default_data_dir()
        found = download_imagenette(
            opts.download, root, url=opts.url, md5=opts.md5, keep_archive=opts.keep_archive
        )
    else:
        found = find_imagenette(opts.find or None)
    print(found)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dino_nb.data``; returns the exit code."""
    return run_program(
        _data,
        DataOptions,
        argv,
        prog="python -m dino_nb.data",
        description="Find or download ImageNette. Prints the dataset folder; errors are one line "
        "and exit code 2.",
        errors=(OSError, ValueError, RuntimeError),  # OSError: also not found, already there
    )


if __name__ == "__main__":
    sys.exit(main())
