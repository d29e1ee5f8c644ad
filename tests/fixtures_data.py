"""Helpers for the data and download tests: tiny image folders, tarballs, a loopback HTTP server."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = (
    "n01440764",
    "n02102040",
    "n02979186",
    "n03000684",
    "n03028079",
    "n03394916",
    "n03417042",
    "n03425413",
    "n03445777",
    "n03888257",
)

MINI = Path(__file__).resolve().parents[2] / "shared/data/imagenette-mini"


def write_image(
    path: Path,
    size: tuple[int, int] = (24, 20),
    mode: str = "RGB",
    fmt: str = "JPEG",
    seed: int = 0,
) -> Path:
    """Write a small random image in ``mode`` (RGB, L, CMYK, P, RGBA) as ``fmt``."""
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "P":
        img = rgb.convert("P")
        img.info["transparency"] = 0
    else:
        img = rgb.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":
        img.save(path, fmt, transparency=0)
    else:
        img.save(path, fmt)
    return path


def make_folder(
    root: Path, classes=("a", "b"), n_train: int = 3, n_val: int = 2, size=(24, 20)
) -> Path:
    """``root/{train,val}/<class>/<i>.jpg`` with random JPEGs."""
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            for i in range(n):
                write_image(root / split / name / f"{i}.jpg", size=size, seed=100 * c + i)
    return root


def make_imagenette_like(root: Path, n_train: int = 1, n_val: int = 1) -> Path:
    """A folder with ImageNette's layout and class ids (tiny images)."""
    return make_folder(root, classes=WNIDS, n_train=n_train, n_val=n_val, size=(16, 16))


def tar_of_folder(folder: Path, arcname: str) -> bytes:
    """A .tgz (bytes) holding ``folder`` under the name ``arcname``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(folder, arcname=arcname)
    return buf.getvalue()


def tar_with(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A .tgz (bytes) of hand-made members: ``(TarInfo, data or None)``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def file_member(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class LoopbackServer:
    """An HTTP server on 127.0.0.1 (free port) serving ``files`` with ``Range`` support.

    Args:
        files: ``{"/name": bytes}``.
        cut_after: when set, the first full (non-range) response announces the whole
            length but sends only this many bytes and closes the connection.
        ignore_range: answer ``Range`` requests with the whole file (status 200).

    Attributes:
        requests: ``(path, Range header or None)`` of every request, in order.
    """

    def __init__(
        self, files: dict[str, bytes], cut_after: int | None = None, ignore_range: bool = False
    ) -> None:
        self.files = files
        self.cut_after = cut_after
        self.ignore_range = ignore_range
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                cut = server.cut_after is not None and start == 0
                if cut:
                    self.send_header("Connection", "close")
                self.end_headers()
                if cut:
                    self.wfile.write(body[: server.cut_after])
                    self.wfile.flush()
                    server.cut_after = None  # only the first time
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
