"""Download ImageNette safely: progress bar, resume, md5 check, safe extraction.

torchvision already knows where the archives live and their md5 sums
(``torchvision.datasets.Imagenette._ARCHIVES``); this module reads them from there rather
than copying them, and adds what torchvision's downloader lacks:

- a tqdm progress bar;
- resume: bytes land in ``<archive>.part`` and an interrupted download continues with an
  HTTP ``Range`` request (a server that ignores ``Range`` makes it start over);
- an md5 check of the finished archive (a mismatch deletes it, so the next try starts
  from zero instead of resuming a bad file);
- safe extraction: members with absolute paths, ``..``, links (symbolic or hard) and
  device files are refused before anything is written (``tarfile``'s extraction filters
  only arrived in Python 3.12/3.14); the archive is unpacked into a hidden temporary
  folder beside the target and renamed into place at the end, so an interrupted
  extraction never leaves a half dataset that later looks complete.

Example:
    >>> from dino_nb.tools.download import download_imagenette
    >>> root = download_imagenette("320px", root="data")  # doctest: +SKIP
    >>> root                                              # doctest: +SKIP
    PosixPath('data/imagenette2-320')
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal
from urllib.parse import urlparse
from zlib import error as zlib_error

from ..sources import default_data_dir, default_search_roots, find_imagenette
from .pretrained import reachable

Size = Literal["320px", "160px", "full"]
SIZES: tuple[str, ...] = ("320px", "160px", "full")

#: Approximate archive sizes in bytes (for messages only; the md5 sums come from torchvision).
APPROX_BYTES = {"full": 1_557_161_267, "320px": 341_663_724, "160px": 99_003_388}

_CHUNK = 1 << 20  # 1 MiB per read: small enough for a smooth bar, big enough to be cheap


def torchvision_archives() -> dict[str, tuple[str, str]]:
    """The ImageNette archives torchvision knows: ``{size: (url, md5)}``.

    Raises:
        RuntimeError: when the installed torchvision has no ``Imagenette._ARCHIVES``
            (older than 0.17, or a future version that renamed it); pass ``url`` and ``md5``
            to :func:`download_imagenette` then.
    """
    try:
        from torchvision.datasets import Imagenette

        archives = dict(Imagenette._ARCHIVES)
        if not all(isinstance(v, tuple) and len(v) == 2 for v in archives.values()):
            raise TypeError(f"unexpected layout {archives!r}")
    except (ImportError, AttributeError, TypeError) as err:
        import torchvision

        raise RuntimeError(
            f"torchvision {torchvision.__version__} does not expose Imagenette._ARCHIVES ({err}); "
            "pass url= and md5= to download_imagenette (see https://github.com/fastai/imagenette)"
        ) from err
    return archives


def md5sum(path: str | os.PathLike, chunk_size: int = 8 * _CHUNK) -> str:
    """Hex md5 digest of a file, read in chunks (a 1.5 GB archive takes a few seconds)."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """``"bytes 100-199/200"`` -> ``(100, 200)``; ``None`` when absent or unparsable."""
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value)
    if m is None:
        return None
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _progress(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=not enabled,
    )


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> bool:
    """Append the rest of ``url`` to ``part``; return whether the body arrived complete."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "dino-nb"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing left to send: the .part is already whole
            return True
        raise
    with response:
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None else None  # bytes in this response
        if getattr(response, "status", 200) == 206:
            parsed = _parse_content_range(response.headers.get("Content-Range"))
            if not offset or parsed is None or parsed[0] != offset:
                raise OSError(
                    f"{url}: the server sent bytes {response.headers.get('Content-Range')!r} when asked for "
                    f"bytes {offset}-; delete {part} and run again"
                )
            mode = "ab"
        else:  # 200: the server ignored Range (or none was sent) and sends the whole file
            offset, mode = 0, "wb"
        total = offset + expected if expected is not None else None
        if total is not None:
            _check_free_space(part.parent, total - offset)
        received = 0
        with (
            open(part, mode) as f,
            _progress(total, offset, part.name.removesuffix(".part"), progress) as bar,
        ):
            while True:
                try:
                    block = response.read(_CHUNK)
                except (OSError, ValueError):  # connection reset mid-body (http.client raises both)
                    break
                if not block:
                    break
                f.write(block)
                received += len(block)
                bar.update(len(block))
    return expected is None or received >= expected


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(
            f"not enough disk space in {folder}: {needed / 1e6:.0f} MB needed, {free / 1e6:.0f} MB free"
        )


def download_file(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming after interruptions.

    An existing ``dest`` whose md5 matches is kept as it is. An existing ``dest.part`` (from
    an interrupted earlier run) is continued with an HTTP ``Range`` request. A connection
    that drops mid-body is retried up to ``retries`` times, each retry resuming where the
    last one stopped.

    Args:
        url: ``http://``, ``https://`` or ``file://`` address.
        dest: where the finished file goes; its folder is created.
        md5: expected hex digest; ``None`` skips the check.
        retries: how many times an interrupted transfer is resumed before giving up.
        timeout: seconds to wait on the connection before a read counts as failed.
        progress: show a tqdm progress bar.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: when the md5 sum does not match; the bad file is deleted, so running
            again downloads it afresh.
        OSError: when the transfer keeps failing, or the disk is too full.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        if md5 is None or md5sum(dest) == md5:
            return dest
        dest.unlink()  # a stale or damaged earlier download
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            if _fetch_once(url, part, timeout, progress):
                break
        except urllib.error.HTTPError as err:
            raise OSError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if attempt == retries:
                raise OSError(f"download of {url} failed after {retries + 1} tries: {err}") from err
        if attempt == retries:
            raise OSError(
                f"download of {url} stopped early {retries + 1} times; {part} keeps the bytes so far, run again to resume"
            )
        time.sleep(min(2.0**attempt, 30.0) * 0.1)
    if md5 is not None:
        got = md5sum(part)
        if got != md5:
            part.unlink()
            raise ValueError(
                f"md5 mismatch for {url}: expected {md5}, got {got}; the bad file was deleted, run again to download it afresh"
            )
    os.replace(part, dest)
    return dest


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be extracted, or ``None`` when it is a plain file or folder."""
    name = member.name
    if (
        name.startswith(("/", "\\"))
        or PureWindowsPath(name).drive
        or PurePosixPath(name).is_absolute()
    ):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "'..' in path"
    if member.issym():
        return f"symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    if member.ischr() or member.isblk() or member.isfifo():
        return "device or fifo"
    if not (member.isfile() or member.isdir()):
        return f"unsupported member type {member.type!r}"
    return None


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract plain files and folders of a tar archive into ``dest``, refusing anything else.

    Every member is checked before it is written; a member with an absolute path, ``..``, a
    link (symbolic or hard) or a device file stops the extraction with a ``ValueError``.
    Files are written by this function (no ``tarfile`` extraction), so owners, permissions
    and timestamps from the archive are ignored. ``dest`` should be a fresh folder: the
    caller removes it when this raises (see :func:`extract_atomic`).

    Raises:
        ValueError: naming the first unsafe member, or when the archive is damaged.
    """
    dest = Path(dest).resolve()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _extract_members(archive, dest)
    except (tarfile.TarError, EOFError, zlib_error) as err:  # damaged or not a tar archive at all
        raise ValueError(
            f"{archive} is not a readable tar archive ({err}); delete it and download again"
        ) from err


def _extract_members(archive: str | os.PathLike, dest: Path) -> None:
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:  # streams: one pass over the (compressed) archive
            reason = _unsafe_reason(member)
            if reason is not None:
                raise ValueError(
                    f"refusing to extract {archive}: member {member.name!r} is unsafe ({reason})"
                )
            target = (dest / member.name).resolve()
            if target != dest and dest not in target.parents:  # belt and braces
                raise ValueError(
                    f"refusing to extract {archive}: member {member.name!r} leaves the target"
                )
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # a regular file always has data
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, _CHUNK)


def extract_atomic(archive: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Extract ``archive`` so that ``final`` appears complete or not at all.

    The archive is unpacked into a hidden temporary folder beside ``final`` and renamed into
    place. An archive with one top-level folder (like ImageNette's ``imagenette2-320/``)
    has that folder become ``final``; otherwise the whole extracted tree does.

    Raises:
        FileExistsError: when ``final`` already exists.
        ValueError: when the archive holds an unsafe member (nothing is left behind).
    """
    final = Path(final)
    if final.exists():
        raise FileExistsError(f"{final} already exists; remove it to extract again")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-extract-", dir=final.parent))
    try:
        safe_extract(archive, tmp)
        entries = [p for p in tmp.iterdir()]
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        os.replace(source, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _name_from_url(url: str) -> str:
    name = PurePosixPath(urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot tell an archive name from the url {url!r}")
    return name


def _stem(archive_name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if archive_name.endswith(suffix):
            return archive_name[: -len(suffix)]
    return archive_name.rsplit(".", 1)[0]


def download_imagenette(
    size: Size = "320px",
    root: str | os.PathLike = "data",
    *,
    url: str | None = None,
    md5: str | None = None,
    keep_archive: bool = False,
    progress: bool = True,
    retries: int = 5,
    timeout: float = 60.0,
) -> Path:
    """Download and extract ImageNette into ``root``; return the dataset folder.

    The result is ``<root>/imagenette2-320`` (``imagenette2-160``, ``imagenette2`` for the
    other sizes), holding ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG``. A folder that is
    already there is returned at once, without network access.

    Args:
        size: ``"320px"`` (about 342 MB, shortest side 320), ``"160px"`` (about 99 MB) or
            ``"full"`` (about 1.56 GB).
        root: folder to put the archive and the dataset in.
        url: where to fetch the archive from; default torchvision's address for ``size``.
            Tests point it at a loopback server, users at a mirror.
        md5: expected md5 of the archive; default torchvision's sum for ``size`` (so a
            mirror of the same file needs no md5).
        keep_archive: keep the ``.tgz`` after extraction (deleted by default to save disk).
        progress: show a tqdm progress bar.
        retries: how many times an interrupted transfer is resumed.
        timeout: network timeout in seconds.

    Raises:
        ValueError: for an unknown ``size``, an md5 mismatch or an unsafe archive.
        OSError: when the download fails.
        RuntimeError: when torchvision no longer lists the archives and ``url``/``md5``
            were not given.
    """
    if size not in SIZES:
        raise ValueError(f"unknown ImageNette size {size!r}; choose one of {', '.join(SIZES)}")
    if url is None or md5 is None:
        default_url, default_md5 = torchvision_archives()[size]
        url = url or default_url
        md5 = md5 or default_md5
        archive_name = _name_from_url(default_url)
    else:
        archive_name = _name_from_url(url)
    root = Path(root).expanduser()
    final = root / _stem(archive_name)
    if (final / "train").is_dir() and (final / "val").is_dir():
        return final
    if final.exists():  # a folder without train/ and val/: not ours to replace
        raise FileExistsError(
            f"{final} exists but holds no train/ and val/; remove it and run again"
        )
    archive = download_file(
        url, root / archive_name, md5, retries=retries, timeout=timeout, progress=progress
    )
    extract_atomic(archive, final)
    if not keep_archive:
        archive.unlink()
    return final


def fetch_imagenette(
    size: Size = "160px",
    root: str | os.PathLike | None = None,
    *,
    allowed: bool = True,
    url: str | None = None,
    md5: str | None = None,
    progress: bool = True,
) -> tuple[Path | None, str]:
    """ImageNette for a notebook: found where it is, else downloaded if allowed and the server answers.

    A missing network is not an error here: the folder is then ``None`` and the line says
    how to get the dataset by hand.

    Args:
        size: the release to download (``"160px"``: fastai's, shortest side 160, about 99 MB).
        root: where to download to; default :func:`~dino_nb.sources.default_data_dir`.
        allowed: ``False`` never touches the disk's datasets nor the network (a test
            profile's output must not depend on the machine): only the line is returned.
        url: where to fetch the archive from (a mirror, a test's server); default torchvision's.
        md5: the archive's md5 when ``url`` is a mirror of another file.
        progress: show a progress bar while downloading.

    Returns:
        ``(folder or None, one line saying what happened or what to do)``.
    """
    command = f"python -m dino_nb.data --download {size}"
    by_hand = f"`{command}` (about {APPROX_BYTES[size] / 1e6:.0f} MB)"
    if not allowed:
        return None, f"no download here; to get ImageNette yourself: {by_hand}"
    root = default_data_dir() if root is None else Path(root)
    try:
        found = find_imagenette(search_roots=[root, *default_search_roots()])
        return found, f"ImageNette found in {found}"
    except FileNotFoundError:
        pass
    url = url or torchvision_archives()[size][0]
    if not reachable(url):
        return None, (
            f"ImageNette is not here and {urlparse(url).netloc} does not answer: run {by_hand} "
            "where there is a network, then set $DINO_NB_DATA to the folder that holds it "
            "(on Kaggle: attach an ImageNette dataset)"
        )
    folder = download_imagenette(size, root, url=url, md5=md5, progress=progress)
    return folder, f"ImageNette ({size}) downloaded to {folder}"
