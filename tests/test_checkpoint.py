"""Tests for crash-safe saving and code-free loading of checkpoints."""

import os

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
        f.write(b"PK\x03\x04 half a checkpoint")
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
        f.write(b"junk")
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
