import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from fixtures_data import MINI, make_folder, write_image

import dino_nb.fast.cache as px
from dino_nb.augment import DataAugmentation
from dino_nb.datasets import DataWarning, RobustImageFolder
from dino_nb.fast.crops import DecodeResize
from dino_nb.loader import TrainSampler, make_loader


@pytest.fixture
def counted(monkeypatch):
    """Count the images decoded by the cache builder."""
    calls = []
    real = px._decode

    def decode(d, path):
        calls.append(path)
        return real(d, path)

    monkeypatch.setattr(px, "_decode", decode)
    return calls


@pytest.fixture
def data(tmp_path, monkeypatch):
    """A tiny dataset with JPEGs of several shapes and modes, and a private fallback cache."""
    monkeypatch.setenv(px.CACHE_ENV, str(tmp_path / "home-cache"))
    root = make_folder(tmp_path / "data", n_train=2, n_val=1, size=(30, 20))
    write_image(root / "train" / "a" / "tall.jpg", size=(18, 40), seed=7)
    write_image(root / "train" / "b" / "gray.jpg", size=(25, 25), mode="L", seed=8)
    write_image(root / "train" / "b" / "big.png", size=(160, 120), fmt="PNG", seed=9)
    write_image(root / "train" / "a" / "draft.jpg", size=(200, 150), seed=10)  # JPEG draft at 1/8
    return root


def train_set(root):
    return RobustImageFolder(root / "train")


def expected(dataset, canvas):
    decode = DecodeResize(canvas)
    return np.stack([decode(decode.open(p)).numpy() for p, _ in dataset.samples])


def npy_files(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def set_read_only(root, read_only=True):
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o555 if read_only else 0o755)


# ----------------------------------------------------------------------------- the cache


def test_cache_equals_decode_resize_and_is_built_once(data, counted):
    ds = train_set(data)
    arr = px.canvas_cache(ds, 16, progress=False)
    assert (
        isinstance(arr, np.memmap) and arr.shape == (len(ds), 3, 16, 16) and arr.dtype == np.uint8
    )
    assert np.array_equal(arr, expected(ds, 16))
    path = data / px.CACHE_FOLDER / npy_files(data / px.CACHE_FOLDER)[0]
    assert os.path.samefile(arr.filename, path) and len(counted) == len(ds)
    mtime = path.stat().st_mtime_ns
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others sharing the data

    again = px.canvas_cache(
        train_set(data), 16, progress=False
    )  # a fresh listing of the same files
    assert len(counted) == len(ds), "the second call decoded images"
    assert path.stat().st_mtime_ns == mtime and np.array_equal(again, arr)
    assert not arr.flags.writeable


def test_changed_file_rebuilds_and_the_old_cache_goes(data, counted):
    ds = train_set(data)
    px.canvas_cache(ds, 16, progress=False)
    changed = data / "train" / "a" / "0.jpg"
    st = changed.stat()
    write_image(changed, size=(30, 20), seed=999)  # new content
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    counted.clear()
    arr = px.canvas_cache(train_set(data), 16, progress=False)
    assert len(counted) == len(ds)
    assert np.array_equal(arr, expected(ds, 16))
    assert len(npy_files(data / px.CACHE_FOLDER)) == 1  # the stale cache was deleted


def test_added_and_removed_files_rebuild(data, counted):
    n = len(train_set(data))
    px.canvas_cache(train_set(data), 16, progress=False)
    write_image(data / "train" / "b" / "new.jpg", size=(22, 22), seed=11)
    grown = px.canvas_cache(train_set(data), 16, progress=False)
    assert grown.shape[0] == n + 1 and np.array_equal(grown, expected(train_set(data), 16))
    (data / "train" / "a" / "tall.jpg").unlink()
    shrunk = px.canvas_cache(train_set(data), 16, progress=False)
    assert shrunk.shape[0] == n and np.array_equal(shrunk, expected(train_set(data), 16))
    assert len(counted) == 3 * n + 1


def test_canvas_change_builds_a_second_cache(data, counted):
    ds = train_set(data)
    small = px.canvas_cache(ds, 16, progress=False)
    large = px.canvas_cache(ds, 24, progress=False)
    assert small.shape[-1] == 16 and large.shape[-1] == 24
    assert np.array_equal(large, expected(ds, 24))
    assert len(counted) == 2 * len(ds) and len(npy_files(data / px.CACHE_FOLDER)) == 2


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),  # truncated
        lambda p: p.write_bytes(b"not a numpy file at all" * 10),  # garbage
        lambda p: p.write_bytes(b""),  # empty
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_damaged_cache_is_rebuilt_after_one_warning(data, counted, damage):
    ds = train_set(data)
    first = px.canvas_cache(ds, 16, progress=False)
    path = first.filename
    del first
    damage(px.Path(path))
    counted.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        arr = px.canvas_cache(ds, 16, progress=False)
    data_warnings = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(data_warnings) == 1 and "damaged" in str(data_warnings[0].message)
    assert len(counted) == len(ds) and np.array_equal(arr, expected(ds, 16))


def test_undecodable_image_names_the_file_and_leaves_no_file(data):
    bad = data / "train" / "b" / "1.jpg"
    ds = train_set(data)  # listed while still readable
    bad.write_bytes(b"\xff\xd8 this is no JPEG")
    with pytest.raises(OSError, match=r"cannot decode .*1\.jpg"):
        px.canvas_cache(ds, 16, progress=False, workers=2)
    assert npy_files(data / px.CACHE_FOLDER) == []  # neither a final nor a temporary file


def test_read_only_data_folder_falls_back_to_the_cache_env(data, tmp_path, counted):
    set_read_only(data)
    try:
        arr = px.canvas_cache(train_set(data), 16, progress=False)
        assert not (data / px.CACHE_FOLDER).exists()
        assert px.Path(arr.filename).is_relative_to(tmp_path / "home-cache")
        px.canvas_cache(train_set(data), 16, progress=False)
        assert len(counted) == len(arr)  # the fallback copy is reused
        with pytest.raises(PermissionError, match="DINO_NB_CACHE"):
            px.canvas_cache(train_set(data), 20, cache_dir=data / "elsewhere", progress=False)
    finally:
        set_read_only(data, False)


def test_valid_cache_in_a_read_only_folder_is_used(data, counted):
    first = px.canvas_cache(train_set(data), 16, progress=False)
    set_read_only(data)
    try:
        again = px.canvas_cache(train_set(data), 16, progress=False)
        assert again.filename == first.filename and len(counted) == len(first)
    finally:
        set_read_only(data, False)


def test_fallback_folder_default_and_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.delenv(px.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    local, fallback = px.cache_folders(tmp_path / "d" / "train")
    assert local == (tmp_path / "d" / px.CACHE_FOLDER).resolve()
    assert fallback.parent == tmp_path / "home" / ".cache" / "dino_nb" and fallback.name.startswith(
        "d-"
    )
    with pytest.raises(ValueError, match="canvas"):
        px.canvas_cache(None, 0)
    with pytest.raises(TypeError, match="ImageFolder"):
        px.canvas_cache([1, 2], 16)


def test_cached_canvases_dataset_and_pickling(data):
    folder = train_set(data)
    ds = px.CachedCanvases(folder, 16, progress=False)
    assert len(ds) == len(folder) and ds.classes == folder.classes and ds.targets == folder.targets
    image, label = ds[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label == folder.targets[3]
    assert torch.equal(image, torch.from_numpy(expected(folder, 16)[3]))
    image[:] = 0  # a copy: the cache is untouched
    assert not torch.equal(ds[3][0], image)
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000  # the pixels do not travel with the dataset
    assert torch.equal(pickle.loads(blob)[3][0], ds[3][0])


# ----------------------------------------------------------------------------- the collate


def canvases(n, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(n)
    ]


def test_collate_shapes_dtypes_and_determinism():
    aug = DataAugmentation(n_local_crops=3, global_size=16, local_size=8, normalize=False)
    collate = px.MultiCropCollate(aug)
    images = canvases(4)
    batch = [(img, i % 2, 1000 + i) for i, img in enumerate(images)]
    crops, labels = collate(batch)
    assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    assert all(c.dtype == torch.uint8 for c in crops) and labels.tolist() == [0, 1, 0, 1]
    again, _ = pickle.loads(pickle.dumps(collate))(batch)
    assert all(torch.equal(a, b) for a, b in zip(crops, again, strict=True))
    other, _ = collate([(img, t, s + 1) for img, t, s in batch])
    assert not any(torch.equal(a, b) for a, b in zip(crops, other, strict=True))

    normalised, _ = px.MultiCropCollate(
        DataAugmentation(n_local_crops=3, global_size=16, local_size=8)
    )(batch)
    assert all(c.dtype == torch.float32 for c in normalised)
    assert -3 < float(normalised[0].mean()) < 3 and float(normalised[0].std()) > 0.1
    with pytest.raises(ValueError, match="WithSeeds"):
        collate([(img, 0) for img in images])


def test_collate_uint8_matches_the_float_views():
    batch = [(img, 0, 7 + i) for i, img in enumerate(canvases(3))]
    aug = DataAugmentation(n_local_crops=1, global_size=16, local_size=8, normalize=False)
    crops, _ = px.MultiCropCollate(aug)(batch)
    collate = px.MultiCropCollate(aug)
    images = torch.stack([b[0] for b in batch])
    g = torch.Generator().manual_seed(px.batch_seed([b[2] for b in batch]))
    floats = collate.multicrop(images, g)  # [0, 1]
    for c, f in zip(crops, floats, strict=True):
        assert (c.float() - f * 255).abs().max() <= 0.5 + 1e-3


def test_loader_worker_gives_the_main_process_batches(data):
    aug = DataAugmentation(n_local_crops=2, global_size=12, local_size=8, normalize=False)
    ds = px.WithSeeds(px.CachedCanvases(train_set(data), 16, progress=False))
    runs = []
    for workers in (0, 1):
        sampler = TrainSampler(len(ds), batch_size=4, seed=3)
        loader = make_loader(
            ds,
            4,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            collate_fn=px.MultiCropCollate(aug),
        )
        runs.append(list(loader))
    assert len(runs[0]) == len(ds) // 4
    for (a, la), (b, lb) in zip(*runs, strict=True):
        assert torch.equal(la, lb) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])  # another batch, other views


@pytest.mark.skipif(
    not MINI.is_dir(), reason=f"{MINI} not present (a fresh clone has no ../shared)"
)
def test_imagenette_mini_is_cached_outside_the_shared_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(px.CACHE_ENV, str(tmp_path))
    folder = RobustImageFolder(MINI / "train")
    ds = px.CachedCanvases(folder, 32, progress=False)
    assert not (MINI / px.CACHE_FOLDER).exists() and ds.path.is_relative_to(tmp_path)
    decode = DecodeResize(32)
    for i in (0, len(folder) // 2, len(folder) - 1):
        assert torch.equal(ds[i][0], decode(decode.open(folder.samples[i][0])))
    aug = DataAugmentation(n_local_crops=2, global_size=24, local_size=16, normalize=False)
    crops, labels = px.MultiCropCollate(aug)([(*px.WithSeeds(ds)[(i, i)],) for i in range(8)])
    assert crops[0].shape == (8, 3, 24, 24) and labels.tolist() == ds.targets[:8]
