"""Tests for crash-safe saving and code-free loading of checkpoints."""

import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from dino_nb import checkpoint as C
from dino_nb.config import TrainConfig


class Arbitrary:
    def __init__(self):
        self.x = 1


def test_round_trip_of_plain_containers(tmp_path):
    obj = {
        "student": nn.Linear(3, 2).state_dict(),
        "step": 7,
        "name": "run",
        "pair": (1, 2.5),
        "list": [torch.arange(3), None, True],
        "config": TrainConfig().to_dict(),  # the run config must be weights_only-safe
        "rng": torch.get_rng_state(),
    }
    path = C.save_atomic(obj, tmp_path / "sub" / "dir" / C.LAST)  # parents created
    assert path == tmp_path / "sub" / "dir" / "checkpoint.pth"
    got = C.load(path)
    assert got["step"] == 7 and got["name"] == "run" and got["pair"] == (1, 2.5)
    assert torch.equal(got["list"][0], torch.arange(3)) and got["list"][1:] == [None, True]
    assert got["config"] == obj["config"]
    for k, v in obj["student"].items():
        assert torch.equal(got["student"][k], v)
    assert torch.equal(got["rng"], obj["rng"])
    assert os.listdir(path.parent) == ["checkpoint.pth"]


def test_overwrite_replaces_content(tmp_path):
    path = tmp_path / "ck.pth"
    C.save_atomic({"v": 1}, path)
    C.save_atomic({"v": 2}, path)
    assert C.load(path) == {"v": 2}
    assert os.listdir(tmp_path) == ["ck.pth"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pth"
    C.save_atomic({"step": 1, "w": torch.ones(4)}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:  # the temporary file, by name
            out.write(b"PK\x03\x04 half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(error)):
        C.save_atomic({"step": 2, "w": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    got = C.load(path)
    assert got["step"] == 1 and torch.equal(got["w"], torch.ones(4))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"junk")
        raise OSError("no space left")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        C.save_atomic({"a": 1}, tmp_path / "best_model.pth")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("obj", [nn.Linear(2, 2), Arbitrary()], ids=["module", "object"])
def test_load_refuses_pickled_code(tmp_path, obj):
    path = tmp_path / "evil.pth"
    torch.save(obj, path)
    with pytest.raises(RuntimeError) as info:
        C.load(path)
    assert str(path) in str(info.value)


def test_load_corrupt_file_raises_runtime_error_naming_it(tmp_path):
    path = tmp_path / "bad.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="bad.pth"):
        C.load(path)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        C.load(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError):
        C.load(tmp_path)  # a folder is not a checkpoint


def test_load_map_location(tmp_path):
    path = C.save_atomic({"t": torch.ones(2)}, tmp_path / "c.pth")
    assert C.load(path, map_location=torch.device("cpu"))["t"].device.type == "cpu"


# ---- unreadable files: one clear message, never torch's weights_only=False advice


def assert_clear(info, path, *words):
    message = str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, C.CheckpointError)
    assert str(path) in message, message
    for word in words:
        assert word in message, message
    assert "weights_only" not in message and "issue" not in message, message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # torch's text hidden


@pytest.fixture
def real_checkpoint(tmp_path):
    state = {
        "student": nn.Linear(64, 32).state_dict(),
        "teacher": nn.Linear(64, 32).state_dict(),
        "step": 12,
        "config": TrainConfig().to_dict(),
        "rng": torch.get_rng_state(),
    }
    return C.save_atomic(state, tmp_path / "run" / C.LAST)


@pytest.mark.parametrize("keep", [1, 2, 3, 10, 100, 0.5, -30, -1])
def test_truncated_checkpoint(real_checkpoint, keep):
    data = real_checkpoint.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path = real_checkpoint.with_name("cut.pth")
    path.write_bytes(data[:n])
    with pytest.raises(C.CheckpointError) as info:
        C.load(path)
    assert_clear(info, path, "is truncated", f"({n} bytes)")


def test_truncated_legacy_format(tmp_path):
    path = tmp_path / "old.pth"
    torch.save({"w": torch.ones(100)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(C.CheckpointError) as info:
        C.load(path)
    assert_clear(info, path, "truncated or corrupted", "legacy")


def make_zip(path, **files):
    import zipfile

    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", ["is empty (0 bytes)"]),
        (b"step: 100\nloss: 3.2\n", ["is a text file", "step: 100"]),
        ("déjà vu, pas un checkpoint".encode(), ["is a text file"]),
        (bytes(range(256)) * 4, ["is not a PyTorch checkpoint", "the bytes"]),
        (b"\x00\x01garbage" * 50, ["is not a PyTorch checkpoint"]),
        ("pickle", ["is a Python pickle, not a PyTorch checkpoint"]),
        ("zip", ["is a zip archive but not a PyTorch checkpoint"]),
    ],
    ids=["empty", "text", "utf8-text", "garbage", "nul-bytes", "pickle", "zip"],
)
def test_not_a_checkpoint(tmp_path, content, words):
    import pickle

    path = tmp_path / "checkpoint.pth"
    if content == "pickle":
        path.write_bytes(pickle.dumps({"step": 1}, protocol=2))
    elif content == "zip":
        make_zip(path, **{"notes/readme.txt": "hello"})
    else:
        path.write_bytes(content)
    with pytest.raises(C.CheckpointError) as info:
        C.load(path)
    assert_clear(info, path, *words)


@pytest.mark.parametrize(("obj", "name"), [(nn.Linear(2, 2), "Linear"), (Arbitrary(), "Arbitrary")])
def test_python_objects_refused_with_a_clear_message(tmp_path, obj, name):
    path = tmp_path / "foreign.pth"
    torch.save({"model": obj}, path)
    with pytest.raises(C.CheckpointError) as info:
        C.load(path)
    assert_clear(info, path, "holds a Python object", name, "could run code")


# ---- one previous copy


def test_previous_path():
    assert C.previous_path("out/checkpoint.pth") == Path("out/checkpoint.prev.pth")


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links"])
def test_keep_previous_rotates_one_copy(tmp_path, monkeypatch, links):
    if not links:

        def no_link(*args, **kwargs):
            raise OSError("links not supported")

        monkeypatch.setattr(os, "link", no_link)
    path = tmp_path / C.LAST
    C.save_atomic({"v": 1}, path, keep_previous=True)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]  # nothing to keep yet
    C.save_atomic({"v": 2}, path, keep_previous=True)
    assert C.load(path) == {"v": 2} and C.load(C.previous_path(path)) == {"v": 1}
    C.save_atomic({"v": 3}, path, keep_previous=True)
    assert C.load(path) == {"v": 3} and C.load(C.previous_path(path)) == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pth", "checkpoint.pth"]
    C.save_atomic({"v": 4}, path)  # the default leaves the previous copy alone
    assert C.load(path) == {"v": 4} and C.load(C.previous_path(path)) == {"v": 2}


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-links"])
def test_a_good_copy_exists_at_every_moment(tmp_path, monkeypatch, links):
    path = tmp_path / C.LAST
    C.save_atomic({"v": 1}, path, keep_previous=True)
    C.save_atomic({"v": 2}, path, keep_previous=True)
    seen = []
    real_replace = os.replace

    def good_copies():
        found = {}
        for p in (path, C.previous_path(path)):
            try:
                found[p.name] = C.load(p)["v"]
            except (FileNotFoundError, RuntimeError):
                pass
        return found

    def checked_replace(src, dst):
        seen.append(good_copies())
        real_replace(src, dst)
        seen.append(good_copies())

    monkeypatch.setattr(os, "replace", checked_replace)
    if not links:
        monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError("no links")))
    C.save_atomic({"v": 3}, path, keep_previous=True)
    assert len(seen) == 4 and all(seen), seen  # two renames, checked before and after each
    assert seen[-1] == {"checkpoint.pth": 3, "checkpoint.prev.pth": 2}
    if links:  # the newest name never goes missing
        assert all("checkpoint.pth" in s for s in seen), seen


def test_crash_before_the_last_rename_keeps_both_copies_loadable(tmp_path, monkeypatch):
    path = tmp_path / C.LAST
    C.save_atomic({"v": 1}, path, keep_previous=True)
    C.save_atomic({"v": 2}, path, keep_previous=True)
    real_replace = os.replace

    def crash_on_final(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_final)
    with pytest.raises(KeyboardInterrupt):
        C.save_atomic({"v": 3}, path, keep_previous=True)
    monkeypatch.undo()
    assert C.load(path) == {"v": 2} and C.load(C.previous_path(path)) == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.prev.pth", "checkpoint.pth"]


def test_fallback_to_the_previous_copy(tmp_path):
    path = tmp_path / C.LAST
    C.save_atomic({"v": 1}, path, keep_previous=True)
    C.save_atomic({"v": 2}, path, keep_previous=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the newest loads: no warning
        assert C.load_with_fallback(path) == ({"v": 2}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.warns(UserWarning) as record:
        state, used = C.load_with_fallback(path)
    assert state == {"v": 1} and used == C.previous_path(path)
    assert len(record) == 1
    message = str(record[0].message)
    assert "truncated" in message and str(path) in message and str(used) in message
    path.unlink()  # a crash between the renames when links are not supported
    with pytest.warns(UserWarning, match="not found"):
        assert C.load_with_fallback(path) == ({"v": 1}, C.previous_path(path))


def test_fallback_when_neither_loads(tmp_path):
    path = tmp_path / C.LAST
    with pytest.raises(FileNotFoundError, match="checkpoint.pth"):
        C.load_with_fallback(path)
    path.write_bytes(b"")
    with pytest.raises(C.CheckpointError) as info:  # no previous copy: the newest's own message
        C.load_with_fallback(path)
    assert_clear(info, path, "is empty")
    C.previous_path(path).write_text("not a checkpoint\n")
    with pytest.raises(C.CheckpointError) as info:
        C.load_with_fallback(path)
    assert_clear(
        info, path, "neither copy loads", "is empty", str(C.previous_path(path)), "is a text file"
    )


def test_atomic_file_is_the_one_writer_of_embeddings_and_the_pixel_cache() -> None:
    """One home for atomic writes: the tools and the fast path use checkpoint.atomic_file."""
    import inspect

    from dino_nb.fast import cache
    from dino_nb.tools import embed

    for module in (cache, embed):
        source = inspect.getsource(module)
        assert "atomic_file" in source and "mkstemp" not in source and "os.replace" not in source


def test_atomic_file_writes_by_name_and_cleans_up_on_error(tmp_path) -> None:
    path = tmp_path / "sub" / "out.bin"
    with C.atomic_file(path) as tmp:
        assert tmp.parent == path.parent and not path.exists()
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["out.bin"]
    with pytest.raises(ValueError), C.atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("stop")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["out.bin"]
