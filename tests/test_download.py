import os
import tarfile

import pytest
from fixtures_data import (
    WNIDS,
    LoopbackServer,
    file_member,
    make_imagenette_like,
    md5,
    tar_of_folder,
    tar_with,
)

from dino_nb.sources import find_imagenette
from dino_nb.tools import download as dl
from dino_nb.tools.data import main

PAYLOAD = bytes(range(256)) * 1000  # 256 kB: one read


def big_payload() -> bytes:
    return os.urandom(1 << 16) * 40  # 2.6 MB: the body arrives in several 1 MiB reads


# --------------------------------------------------------------------------- torchvision's tables


def test_torchvision_tables_are_read():
    archives = dl.torchvision_archives()
    assert set(archives) == {"320px", "160px", "full"}
    for url, digest in archives.values():
        assert url.startswith("https://") and url.endswith(".tgz")
        assert len(digest) == 32 and int(digest, 16) >= 0


def test_missing_torchvision_table_fails_gracefully(monkeypatch, tmp_path):
    from torchvision.datasets import Imagenette

    monkeypatch.delattr(Imagenette, "_ARCHIVES")
    with pytest.raises(RuntimeError, match="_ARCHIVES.*url= and md5="):
        dl.torchvision_archives()
    with pytest.raises(RuntimeError):
        dl.download_imagenette("320px", tmp_path, progress=False)
    # with both given, torchvision is not needed
    src = make_imagenette_like(tmp_path / "src")
    blob = tar_of_folder(src, "imagenette2-320")
    with LoopbackServer({"/imagenette2-320.tgz": blob}) as srv:
        root = dl.download_imagenette(
            "320px",
            tmp_path / "data",
            url=srv.url("/imagenette2-320.tgz"),
            md5=md5(blob),
            progress=False,
        )
    assert root == tmp_path / "data" / "imagenette2-320"


def test_unknown_size(tmp_path):
    with pytest.raises(ValueError, match="unknown ImageNette size '240px'.*320px"):
        dl.download_imagenette("240px", tmp_path)


# --------------------------------------------------------------------------- download_file


def test_complete_download(tmp_path):
    data = big_payload()
    with LoopbackServer({"/f.bin": data}) as srv:
        out = dl.download_file(
            srv.url("/f.bin"), tmp_path / "sub" / "f.bin", md5(data), progress=False
        )
    assert out.read_bytes() == data
    assert not (tmp_path / "sub" / "f.bin.part").exists()
    assert srv.requests == [("/f.bin", None)]


def test_download_cut_off_then_resumed(tmp_path):
    data = big_payload()
    with LoopbackServer({"/f.bin": data}, cut_after=100_000) as srv:
        out = dl.download_file(srv.url("/f.bin"), tmp_path / "f.bin", md5(data), progress=False)
    assert out.read_bytes() == data
    assert [r for _, r in srv.requests] == [None, "bytes=100000-"]


def test_existing_part_file_is_resumed(tmp_path):
    data = big_payload()
    (tmp_path / "f.bin.part").write_bytes(data[:12345])
    with LoopbackServer({"/f.bin": data}) as srv:
        out = dl.download_file(srv.url("/f.bin"), tmp_path / "f.bin", md5(data), progress=False)
    assert out.read_bytes() == data
    assert srv.requests == [("/f.bin", "bytes=12345-")]


def test_complete_part_file_gets_416_and_is_kept(tmp_path):
    data = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(data)
    with LoopbackServer({"/f.bin": data}) as srv:
        out = dl.download_file(srv.url("/f.bin"), tmp_path / "f.bin", md5(data), progress=False)
    assert out.read_bytes() == data


def test_server_without_range_support_restarts(tmp_path):
    data = PAYLOAD
    (tmp_path / "f.bin.part").write_bytes(b"garbage that must not stay in front")
    with LoopbackServer({"/f.bin": data}, ignore_range=True) as srv:
        out = dl.download_file(srv.url("/f.bin"), tmp_path / "f.bin", md5(data), progress=False)
    assert out.read_bytes() == data


def test_md5_mismatch_deletes_the_bad_file(tmp_path):
    data = PAYLOAD
    with LoopbackServer({"/f.bin": data}) as srv:
        with pytest.raises(ValueError, match="md5 mismatch.*expected 0{32}.*deleted"):
            dl.download_file(srv.url("/f.bin"), tmp_path / "f.bin", "0" * 32, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_existing_file_with_right_md5_is_not_downloaded_again(tmp_path):
    data = PAYLOAD
    (tmp_path / "f.bin").write_bytes(data)
    with LoopbackServer({"/f.bin": data}) as srv:
        dl.download_file(srv.url("/f.bin"), tmp_path / "f.bin", md5(data), progress=False)
    assert srv.requests == []


def test_http_error_is_one_clear_oserror(tmp_path):
    with LoopbackServer({}) as srv:
        with pytest.raises(OSError, match="HTTP 404"):
            dl.download_file(srv.url("/missing.tgz"), tmp_path / "m.tgz", progress=False)


# --------------------------------------------------------------------------- download_imagenette


def test_download_imagenette_end_to_end(tmp_path):
    src = make_imagenette_like(tmp_path / "src")
    blob = tar_of_folder(src, "imagenette2-320")
    root = tmp_path / "data"
    with LoopbackServer({"/imagenette2-320.tgz": blob}, cut_after=len(blob) // 2) as srv:
        out = dl.download_imagenette(
            "320px", root, url=srv.url("/imagenette2-320.tgz"), md5=md5(blob), progress=False
        )
        assert out == root / "imagenette2-320"
        assert sorted(p.name for p in (out / "train").iterdir()) == list(WNIDS)
        assert sorted(os.listdir(root)) == ["imagenette2-320"]  # archive deleted, no temp folders
        assert find_imagenette(search_roots=[root]) == out
        n_requests = len(srv.requests)
        again = dl.download_imagenette(
            "320px", root, url=srv.url("/imagenette2-320.tgz"), md5=md5(blob), progress=False
        )
        assert again == out and len(srv.requests) == n_requests  # already there: no network


def test_download_imagenette_keep_archive_and_cli(tmp_path, capsys):
    src = make_imagenette_like(tmp_path / "src")
    blob = tar_of_folder(src, "imagenette2-160")
    root = tmp_path / "data"
    with LoopbackServer({"/imagenette2-160.tgz": blob}) as srv:
        url = srv.url("/imagenette2-160.tgz")
        rc = main(["--download", "160px", "--root", str(root), "--url", url, "--md5", "f" * 32])
        last = capsys.readouterr().err.splitlines()[-1]  # the progress bar goes to stderr before it
        assert rc == 2 and last.startswith("error: md5 mismatch") and "deleted" in last
        rc = main(
            [
                "--download",
                "160px",
                "--root",
                str(root),
                "--url",
                url,
                "--md5",
                md5(blob),
                "--keep-archive",
            ]
        )
    out = capsys.readouterr().out.strip()
    assert rc == 0 and out == str(root / "imagenette2-160")
    assert (root / "imagenette2-160.tgz").is_file()


# --------------------------------------------------------------------------- safe extraction


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _device(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info, None


MALICIOUS = {
    "dotdot": lambda out: [
        file_member("imagenette2-320/ok.txt"),
        file_member("imagenette2-320/../../outside/evil.txt"),
    ],
    "absolute": lambda out: [
        file_member("imagenette2-320/ok.txt"),
        file_member(str(out / "abs.txt")),
    ],
    "symlink": lambda out: [
        _link("imagenette2-320/link", str(out), tarfile.SYMTYPE),
        file_member("imagenette2-320/link/evil.txt"),
    ],
    "hardlink": lambda out: [
        _link("imagenette2-320/hard", str(out / "victim.txt"), tarfile.LNKTYPE)
    ],
    "device": lambda out: [_device("imagenette2-320/null")],
}


REASONS = {
    "dotdot": "'..' in path",
    "absolute": "absolute path",
    "symlink": "symbolic link",
    "hardlink": "hard link",
    "device": "device",
}


@pytest.mark.parametrize("kind", sorted(MALICIOUS))
def test_malicious_tarball_is_refused(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me")
    blob = tar_with(MALICIOUS[kind](outside))
    root = tmp_path / "data" / "deep"
    root.mkdir(parents=True)
    with LoopbackServer({"/imagenette2-320.tgz": blob}) as srv:
        with pytest.raises(ValueError, match=f"unsafe \\({REASONS[kind]}"):
            dl.download_imagenette(
                "320px", root, url=srv.url("/imagenette2-320.tgz"), md5=md5(blob), progress=False
            )
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert (outside / "victim.txt").read_text() == "keep me"
    assert sorted(os.listdir(root)) == ["imagenette2-320.tgz"]  # no dataset, no temp folder


def test_interrupted_extraction_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    src = make_imagenette_like(tmp_path / "src")
    archive = tmp_path / "imagenette2-320.tgz"
    archive.write_bytes(tar_of_folder(src, "imagenette2-320"))
    calls = {"n": 0}
    real = dl.shutil.copyfileobj

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dl.shutil, "copyfileobj", flaky)
    with pytest.raises(KeyboardInterrupt):
        dl.extract_atomic(archive, tmp_path / "imagenette2-320")
    assert sorted(os.listdir(tmp_path)) == ["imagenette2-320.tgz", "src"]
    monkeypatch.setattr(dl.shutil, "copyfileobj", real)
    out = dl.extract_atomic(archive, tmp_path / "imagenette2-320")
    assert find_imagenette(out) == out
    with pytest.raises(FileExistsError):
        dl.extract_atomic(archive, out)


def test_archive_without_single_top_folder(tmp_path):
    blob = tar_with([file_member("train/a/0.txt"), file_member("val/a/0.txt")])
    archive = tmp_path / "x.tgz"
    archive.write_bytes(blob)
    out = dl.extract_atomic(archive, tmp_path / "x")
    assert (out / "train" / "a" / "0.txt").read_bytes() == b"x"


def test_damaged_archive_is_a_clear_error(tmp_path):
    blob = tar_of_folder(make_imagenette_like(tmp_path / "src"), "imagenette2-320")
    archive = tmp_path / "imagenette2-320.tgz"
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="not a readable tar archive"):
        dl.extract_atomic(archive, tmp_path / "imagenette2-320")
    assert sorted(os.listdir(tmp_path)) == ["imagenette2-320.tgz", "src"]


def test_foreign_folder_in_the_way_is_not_replaced(tmp_path):
    (tmp_path / "imagenette2-320" / "mine").mkdir(parents=True)
    with LoopbackServer({}) as srv:
        with pytest.raises(FileExistsError, match="holds no train/ and val/"):
            dl.download_imagenette(
                "320px", tmp_path, url=srv.url("/imagenette2-320.tgz"), md5="0" * 32, progress=False
            )
    assert srv.requests == []


# --------------------------------------------------------------------------- a notebook's fetch


def _no_search(**kwargs):
    raise FileNotFoundError("ImageNette not found")


def test_fetch_not_allowed_touches_nothing(monkeypatch, tmp_path):
    """The test profile: no search, no network, one line with the command to run."""
    monkeypatch.setattr(dl, "find_imagenette", lambda **kw: pytest.fail("searched"))
    monkeypatch.setattr(dl, "reachable", lambda url: pytest.fail("asked the network"))
    folder, line = dl.fetch_imagenette("160px", tmp_path, allowed=False)
    assert folder is None
    assert line == (
        "no download here; to get ImageNette yourself: "
        "`python -m dino_nb.data --download 160px` (about 99 MB)"
    )
    assert not os.listdir(tmp_path)


def test_fetch_finds_before_it_downloads(monkeypatch, tmp_path):
    src = make_imagenette_like(tmp_path / "data" / "imagenette2-160")
    monkeypatch.setattr(dl, "reachable", lambda url: pytest.fail("asked the network"))
    folder, line = dl.fetch_imagenette("160px", tmp_path / "data")
    assert folder == src and line == f"ImageNette found in {src}"


def test_fetch_without_network_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(dl, "find_imagenette", _no_search)
    with LoopbackServer({}) as srv:
        url = srv.url("/imagenette2-160.tgz")
    # the server is gone: nothing answers at its address
    folder, line = dl.fetch_imagenette("160px", tmp_path, url=url, md5="0" * 32)
    assert folder is None
    assert "does not answer: run `python -m dino_nb.data --download 160px`" in line
    assert not os.listdir(tmp_path)


def test_fetch_downloads_when_missing_and_the_server_answers(monkeypatch, tmp_path):
    monkeypatch.setattr(dl, "find_imagenette", _no_search)
    blob = tar_of_folder(make_imagenette_like(tmp_path / "src"), "imagenette2-160")
    with LoopbackServer({"/imagenette2-160.tgz": blob}) as srv:
        folder, line = dl.fetch_imagenette(
            "160px",
            tmp_path / "data",
            url=srv.url("/imagenette2-160.tgz"),
            md5=md5(blob),
            progress=False,
        )
    assert folder == tmp_path / "data" / "imagenette2-160"
    assert line == f"ImageNette (160px) downloaded to {folder}"
    assert sorted(p.name for p in (folder / "val").iterdir()) == list(WNIDS)
