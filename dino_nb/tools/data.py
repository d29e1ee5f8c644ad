"""``python -m dino_nb.data``: find ImageNette on this machine or download it; prints its folder."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..sources import default_data_dir, find_imagenette


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m dino_nb.data",
        description="Find or download ImageNette. Prints the dataset folder; errors are one line and exit code 2.",
    )
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--find",
        nargs="?",
        const="",
        metavar="PATH",
        help="find ImageNette (below PATH, or in the usual places)",
    )
    action.add_argument(
        "--download",
        choices=("320px", "160px", "full"),
        metavar="SIZE",
        help="download 320px, 160px or full",
    )
    p.add_argument(
        "--root", default=None, help="folder to download into (default: $DINO_NB_DATA or data/)"
    )
    p.add_argument("--url", default=None, help="download from this address instead (a mirror)")
    p.add_argument("--md5", default=None, help="expected md5 of the archive at --url")
    p.add_argument("--keep-archive", action="store_true", help="keep the .tgz after extracting it")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dino_nb.data``; returns the exit code."""
    args = _parse_args(argv)
    try:
        if args.download is not None:
            from .download import download_imagenette

            root = args.root if args.root is not None else default_data_dir()
            found = download_imagenette(
                args.download, root, url=args.url, md5=args.md5, keep_archive=args.keep_archive
            )
        else:
            found = find_imagenette(args.find or None)
    except (FileNotFoundError, FileExistsError, ValueError, OSError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(found)
    return 0


if __name__ == "__main__":
    sys.exit(main())
