"""Tests for the built-in shapes dataset: deterministic, ImageFolder layout, crash-safe."""

import os

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from dino_nb import sources as S


def files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_generation_is_deterministic(tmp_path):
    S.generate(tmp_path / "a", n_train=2, n_val=1)
    S.generate(tmp_path / "b", n_train=2, n_val=1)
    fa, fb = files(tmp_path / "a"), files(tmp_path / "b")
    assert fa == fb and len(fa) == 30
    for rel in fa:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    S.generate(tmp_path / "c", n_train=2, n_val=1, seed=1)
    assert (tmp_path / "c/train/disc/0000.png").read_bytes() != (
        tmp_path / "a/train/disc/0000.png"
    ).read_bytes()


def test_render_is_a_function_of_the_rng_state():
    a = S.render(3, np.random.default_rng(7))
    b = S.render(3, np.random.default_rng(7))
    assert a.size == (S.IMAGE_SIZE, S.IMAGE_SIZE) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    return S.ensure_builtin_dataset(tmp_path_factory.mktemp("data"))


def test_image_folder_layout_with_ten_classes(builtin):
    assert builtin.name == S.DIRNAME == f"builtin-shapes-v{S.VERSION}"
    assert (builtin / ".complete").is_file()
    assert len(S.CLASSES) == 10
    for split, n in (("train", S.N_TRAIN_PER_CLASS), ("val", S.N_VAL_PER_CLASS)):
        folder = ImageFolder(str(builtin / split))
        assert folder.classes == sorted(S.CLASSES)
        assert len(folder) == 10 * n
        counts = np.bincount(folder.targets, minlength=10)
        assert counts.tolist() == [n] * 10
    with Image.open(builtin / "train" / "star" / "0000.png") as img:
        assert img.size == (S.IMAGE_SIZE, S.IMAGE_SIZE) and img.mode == "RGB"
    # no temporary folder left
    assert not [p for p in builtin.parent.iterdir() if p.name.startswith(".")]


def test_second_call_reuses_the_dataset(builtin, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(S, "generate", fail)
    assert S.ensure_builtin_dataset(builtin.parent) == builtin


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_generation_leaves_no_complete_looking_folder(tmp_path, monkeypatch, error):
    original = S.generate

    def interrupted(root, *args, **kwargs):
        original(root, n_train=2, n_val=1)  # half the work is on disk
        raise error

    monkeypatch.setattr(S, "generate", interrupted)
    with pytest.raises(type(error)):
        S.ensure_builtin_dataset(tmp_path)
    assert not (tmp_path / S.DIRNAME).exists()
    assert os.listdir(tmp_path) == []  # the temporary folder is removed too

    # the next call generates it properly
    monkeypatch.setattr(S, "generate", lambda root: original(root, n_train=2, n_val=1))
    root = S.ensure_builtin_dataset(tmp_path)
    assert (root / ".complete").is_file() and len(files(root / "train")) == 20


def test_incomplete_leftover_without_marker_is_replaced(tmp_path, monkeypatch):
    stale = tmp_path / S.DIRNAME / "train" / "disc"
    stale.mkdir(parents=True)
    (stale / "broken.png").write_bytes(b"")
    original = S.generate
    monkeypatch.setattr(S, "generate", lambda root: original(root, n_train=1, n_val=1))
    root = S.ensure_builtin_dataset(tmp_path)
    assert (root / ".complete").is_file()
    assert not (root / "train" / "disc" / "broken.png").exists()
    assert len(files(root / "train")) == 10


def test_default_data_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_NB_DATA", str(tmp_path / "elsewhere"))
    assert S.default_data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("DINO_NB_DATA")
    assert S.default_data_dir().name == "data"
