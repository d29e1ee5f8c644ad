import warnings
from pathlib import Path

import pytest
import torch
from fixtures_data import MINI, WNIDS, make_folder, make_imagenette_like, write_image

from dino_nb import datasets as D
from dino_nb import loader, sources
from dino_nb.augment import DataAugmentation
from dino_nb.tools import data as data_cli

REPO = Path(__file__).resolve().parents[1]


def tiny_aug(size: int = 32) -> DataAugmentation:
    return DataAugmentation(
        (0.4, 1.0), (0.05, 0.4), n_local_crops=2, global_size=size, local_size=size // 2
    )


# --------------------------------------------------------------------------- labels


def test_labels_file_and_package_copy_are_identical():
    assert (REPO / "data/imagenette_labels.json").read_bytes() == (
        REPO / "dino_nb/imagenette_labels.json"
    ).read_bytes()


def test_labels_content():
    labels = sources.imagenette_labels()
    assert tuple(sorted(labels)) == WNIDS
    assert labels["n01440764"] == "tench"
    assert labels["n02102040"] == "English springer"
    assert labels["n03888257"] == "parachute"
    labels["n01440764"] = "changed"  # a copy: the cache is not touched
    assert sources.imagenette_labels()["n01440764"] == "tench"
    assert D.class_names(["n03445777", "disc"]) == ["golf ball", "disc"]


# --------------------------------------------------------------------------- find_imagenette


def test_find_kaggle_style_nested_folder(tmp_path):
    root = make_imagenette_like(
        tmp_path / "input" / "imagenette" / "imagenette2-320" / "imagenette2-320"
    )
    assert sources.find_imagenette(search_roots=[tmp_path / "input"]) == root
    assert sources.find_imagenette(tmp_path / "input") == root  # explicit path: nested search too
    assert sources.find_imagenette(root) == root


def test_find_prefers_earlier_roots_and_320(tmp_path):
    a = make_imagenette_like(tmp_path / "a" / "imagenette2-160")
    b = make_imagenette_like(tmp_path / "b" / "imagenette2-160")
    a320 = make_imagenette_like(tmp_path / "a" / "imagenette2-320")
    assert (
        sources.find_imagenette(search_roots=[tmp_path / "missing", tmp_path / "a", tmp_path / "b"])
        == a320
    )
    assert sources.find_imagenette(search_roots=[tmp_path / "b", tmp_path / "a"]) == b
    assert a.is_dir()


def test_find_depth_is_bounded_and_hidden_folders_skipped(tmp_path):
    make_imagenette_like(tmp_path / "1" / "2" / "3" / "4")
    make_imagenette_like(tmp_path / ".imagenette2-320-extract-tmp")
    with pytest.raises(FileNotFoundError) as info:
        sources.find_imagenette(search_roots=[tmp_path, tmp_path / "nope"], max_depth=3)
    msg = str(info.value)
    assert str(tmp_path) in msg and f"{tmp_path / 'nope'} (missing)" in msg
    assert "python -m dino_nb.data --download 320px" in msg
    assert (
        sources.find_imagenette(search_roots=[tmp_path], max_depth=4)
        == tmp_path / "1" / "2" / "3" / "4"
    )


def test_find_needs_the_imagenette_class_ids(tmp_path):
    make_folder(tmp_path / "other", classes=("cat", "dog"))
    with pytest.raises(FileNotFoundError):
        sources.find_imagenette(tmp_path / "other")


def test_explicit_path_is_authoritative(tmp_path, monkeypatch):
    make_imagenette_like(tmp_path / "env" / "imagenette2-320")
    monkeypatch.setenv("DINO_NB_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match="wrong"):
        sources.find_imagenette(tmp_path / "wrong")


def test_default_search_roots_order(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_NB_DATA", str(tmp_path / "env"))
    roots = sources.default_search_roots()
    assert roots[0] == tmp_path / "env"
    assert Path("/kaggle/input") in roots and Path("/content") in roots
    assert roots.index(Path("/kaggle/input")) < roots.index(Path("/content"))
    assert len(roots) == len(set(roots))
    found = make_imagenette_like(tmp_path / "env" / "imagenette2-320")
    assert sources.find_imagenette() == found
    assert sources.resolve_data_root("imagenette") == found


def test_data_imagenette_not_found_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "default_search_roots", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError, match=r"--download 320px"):
        D.build_datasets("imagenette", tiny_aug(), 32)


def test_imagenette_available(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "default_search_roots", lambda: [tmp_path])
    assert not sources.imagenette_available()
    make_imagenette_like(tmp_path / "imagenette2-320")
    assert sources.imagenette_available()


def test_resolve_nested_path_and_errors(tmp_path):
    root = make_imagenette_like(tmp_path / "dl" / "imagenette2-320")
    assert sources.resolve_data_root(tmp_path / "dl") == root
    with pytest.raises(FileNotFoundError, match="not found"):
        sources.resolve_data_root(tmp_path / "nothing")
    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no val subfolder"):
        sources.resolve_data_root(tmp_path / "half")


def test_cli_find(tmp_path, capsys):
    root = make_imagenette_like(tmp_path / "x" / "imagenette2-320")
    assert data_cli.main(["--find", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(root)
    assert data_cli.main(["--find", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ImageNette not found") and err.count("\n") == 1


# --------------------------------------------------------------------------- odd and bad images


def test_cmyk_grayscale_palette_and_tiny_images_load_as_rgb(tmp_path):
    root = make_folder(tmp_path, classes=("a", "b"), n_train=1, n_val=1)
    write_image(tmp_path / "train/a/cmyk.jpg", mode="CMYK")
    write_image(tmp_path / "train/a/gray.png", mode="L", fmt="PNG")
    write_image(tmp_path / "train/b/palette.png", mode="P", fmt="PNG")
    write_image(tmp_path / "train/b/rgba.png", mode="RGBA", fmt="PNG")
    write_image(tmp_path / "train/b/tiny.jpg", size=(5, 3))  # smaller than every crop
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all for these
        bundle = D.build_datasets(root, tiny_aug(32), 40)
    assert len(bundle.train_plain) == 7 and bundle.unreadable == {}
    for i in range(len(bundle.train_plain)):
        x, _ = bundle.train_plain[i]
        assert x.shape == (3, 40, 40) and torch.isfinite(x).all()
        crops, _ = bundle.train_aug[i]
        assert [c.shape for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert Path(bundle.train_plain.samples[0][0]).name == "0.jpg"
    assert D.rgb_loader(str(tmp_path / "train/a/cmyk.jpg")).mode == "RGB"


def _bad_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    root = make_folder(tmp_path, classes=("a", "b"), n_train=2, n_val=1)
    garbage = tmp_path / "train/a/garbage.jpg"
    garbage.write_bytes(b"this is not an image")
    truncated = write_image(
        tmp_path / "train/b/truncated.jpg", size=(200, 150)
    )  # big enough to cut in the pixels
    good = truncated.read_bytes()
    truncated.write_bytes(good[: len(good) // 2])
    png = write_image(tmp_path / "val/a/cut.png", fmt="PNG").read_bytes()
    cut_png = tmp_path / "val/a/cut.png"
    cut_png.write_bytes(png[: len(png) // 2])
    return root, sorted(str(p) for p in (garbage, truncated, cut_png))


def test_unreadable_files_are_skipped_with_one_warning(tmp_path):
    root, bad = _bad_folder(tmp_path)
    with pytest.warns(D.DataWarning) as record:
        bundle = D.build_datasets(root, tiny_aug(), 32)
    assert len(record) == 1
    message = str(record[0].message)
    assert "3 unreadable" in message and all(p in message for p in bad)
    assert sorted(bundle.unreadable) == bad
    kept = {p for p, _ in bundle.train_plain.samples} | {p for p, _ in bundle.val_plain.samples}
    assert kept.isdisjoint(bad)
    assert len(bundle.train_plain) == len(bundle.train_aug) == 4 and len(bundle.val_plain) == 2
    assert bundle.train_plain.targets == [t for _, t in bundle.train_plain.samples]


def test_unreadable_files_are_fatal_under_strict(tmp_path):
    root, bad = _bad_folder(tmp_path)
    with pytest.raises(ValueError, match="3 unreadable image.*strict") as info:
        D.build_datasets(root, tiny_aug(), 32, strict=True)
    assert all(p in str(info.value) for p in bad)


def test_check_image_file_reasons(tmp_path):
    root, bad = _bad_folder(tmp_path)
    assert "truncated JPEG" in D.check_image_file(tmp_path / "train/b/truncated.jpg")
    assert D.check_image_file(tmp_path / "train/a/garbage.jpg").startswith("UnidentifiedImageError")
    assert D.check_image_file(tmp_path / "train/a/0.jpg") is None
    many = [str(tmp_path / "train/a/0.jpg")] * 70 + bad  # the threaded path
    assert sorted(D.find_unreadable(many)) == bad


def test_unreadable_file_met_at_load_time(tmp_path):
    root, _ = _bad_folder(tmp_path)
    bundle = D.build_datasets(root, tiny_aug(), 32, scan=False)
    ds = bundle.train_plain
    i = [Path(p).name for p, _ in ds.samples].index("garbage.jpg")
    with pytest.warns(D.DataWarning, match="garbage.jpg"):
        x, y = ds[i]
    assert x.shape == (3, 32, 32) and y == ds.samples[i + 1][1]  # the next sample stands in
    strict = D.build_datasets(root, tiny_aug(), 32, strict=True, scan=False).train_plain
    with pytest.raises(OSError, match="cannot read image .*garbage.jpg"):
        strict[i]


def test_class_with_only_unreadable_files(tmp_path):
    root = make_folder(tmp_path, classes=("a", "b"), n_train=1, n_val=1)
    (tmp_path / "train/b/0.jpg").write_bytes(b"junk")
    with (
        pytest.warns(D.DataWarning),
        pytest.raises(FileNotFoundError, match="no readable images left in class folder.*b"),
    ):
        D.build_datasets(root, tiny_aug(), 32)


# --------------------------------------------------------------------------- layout errors


def test_mismatched_classes_one_error_naming_them(tmp_path):
    make_folder(tmp_path, classes=("a", "b", "c"), n_train=1, n_val=0)
    make_folder(tmp_path, classes=("a", "b", "d"), n_train=0, n_val=1)
    with pytest.raises(ValueError, match=r"only in train \['c'\], only in val \['d'\]"):
        D.build_datasets(tmp_path, tiny_aug(), 32)


def test_empty_class_folder_one_clear_error(tmp_path):
    make_folder(tmp_path, classes=("a", "b", "c"))
    for c in ("b", "c"):
        for f in (tmp_path / "train" / c).glob("*.jpg"):
            f.unlink()
    (tmp_path / "train/c/notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"train: 2 class folder\(s\) hold no images: b, c"):
        D.build_datasets(tmp_path, tiny_aug(), 32)


def test_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    write_image(tmp_path / "train/loose.jpg")
    with pytest.raises(FileNotFoundError, match="holds no class folders"):
        D.build_datasets(tmp_path, tiny_aug(), 32)


def test_hidden_folders_are_not_classes(tmp_path):
    make_folder(tmp_path, classes=("a", "b"))
    (tmp_path / "train/.ipynb_checkpoints").mkdir()
    bundle = D.build_datasets(tmp_path, tiny_aug(), 32)
    assert bundle.classes == ["a", "b"] and bundle.names == ["a", "b"]


# --------------------------------------------------------------------------- loaders


def test_projector_subset_is_fixed_and_balanced(tmp_path):
    make_folder(tmp_path, classes=("a", "b", "c"), n_train=1, n_val=5)
    (tmp_path / "val/c/3.jpg").unlink()
    (tmp_path / "val/c/4.jpg").unlink()
    val = D.RobustImageFolder(tmp_path / "val")
    sub = D.projector_subset(val, 3)
    labels = [val.targets[i] for i in sub.indices]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sub.indices[:3] == [0, 2, 4]  # evenly spread over the class, ends included
    assert D.projector_subset(val, 3).indices == sub.indices
    assert len(D.projector_subset(val, 100)) == 5 + 5 + 3
    with pytest.raises(ValueError, match="n_per_class"):
        D.projector_subset(val, 0)


def test_collate_crops():
    batch = [
        ([torch.zeros(3, 4, 4), torch.ones(3, 2, 2)], 1),
        ([torch.ones(3, 4, 4), torch.zeros(3, 2, 2)], 0),
    ]
    crops, labels = loader.collate_crops(batch)
    assert crops[0].shape == (2, 3, 4, 4) and crops[1].shape == (2, 3, 2, 2)
    assert crops[0][1].sum() == 48 and labels.tolist() == [1, 0]


def test_builtin_still_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_NB_DATA", str(tmp_path))
    calls = []
    monkeypatch.setattr(sources, "ensure_builtin_dataset", lambda: calls.append(1) or tmp_path)
    assert (
        sources.resolve_data_root(None) == tmp_path
        and sources.resolve_data_root("builtin") == tmp_path
    )
    assert len(calls) == 2


# --------------------------------------------------------------------------- the real photos


@pytest.mark.skipif(
    not MINI.is_dir(), reason=f"{MINI} not present (a fresh clone has no ../shared)"
)
def test_imagenette_mini_through_the_real_path():
    root = sources.find_imagenette(MINI)
    assert root == MINI and sources.is_imagenette_root(root)
    bundle = D.build_datasets(root, tiny_aug(64), 48)
    assert bundle.classes == list(WNIDS) and bundle.names[0] == "tench" and bundle.unreadable == {}
    train = loader.make_loader(bundle.train_aug, 8, shuffle=True, collate_fn=loader.collate_crops)
    crops, y = next(iter(train))
    assert crops[0].shape == (8, 3, 64, 64) and crops[-1].shape == (8, 3, 32, 32)
    projector = D.projector_subset(bundle.val_plain, 2)
    for ds in (bundle.train_plain, bundle.val_plain, projector):
        x, y = next(iter(loader.make_loader(ds, 8)))
        assert x.shape == (8, 3, 48, 48) and torch.isfinite(x).all()
    assert len(projector) == 20


# --------------------------------------------------------------------------- unlabelled folders


def nested_photos(root: Path, n: int = 40) -> Path:
    """``n`` random JPEGs at three depths, plus files that are no images or hidden."""
    for i in range(n):
        write_image(
            root / ("deep/er" if i % 3 == 0 else "top" if i % 3 == 1 else ".") / f"{i}.jpg", seed=i
        )
    (root / "notes.txt").write_text("not an image")
    write_image(root / ".dino_nb_cache" / "x.jpg")
    write_image(root / ".ipynb_checkpoints" / "y.jpg")
    write_image(root / "top" / ".hidden.jpg")
    return root


def test_list_images_is_recursive_sorted_and_skips_hidden(tmp_path):
    files = D.list_images(nested_photos(tmp_path, 9))
    assert files == sorted(files) and len(files) == 9
    assert "deep/er/0.jpg" in files and "top/1.jpg" in files and "2.jpg" in files
    assert not any(part.startswith(".") for f in files for part in f.split("/"))


def test_held_out_is_a_fixed_small_share_chosen_by_name():
    paths = [f"p/{i}.jpg" for i in range(1000)]
    aside = D.held_out(paths)
    assert len(aside) == 50 and aside == D.held_out(list(reversed(paths)))
    assert D.held_out(paths[:500] + ["new.jpg"]) >= aside & set(paths[:500]) - {max(aside)}
    assert len(D.held_out([f"{i}" for i in range(100_000)])) == D.HOLD_OUT_MAX
    assert len(D.held_out(["a", "b", "c"])) == 1  # never more than half


def test_build_datasets_opens_a_nested_folder_without_labels(tmp_path):
    root = nested_photos(tmp_path / "photos")
    bundle = D.build_datasets(root, tiny_aug(), 32)
    assert not bundle.labelled and bundle.classes == [] and bundle.root == root
    train = {p for p, _ in bundle.train_plain.samples}
    val = {p for p, _ in bundle.val_plain.samples}
    assert not train & val and len(train | val) == 40 and len(val) == D.HOLD_OUT_MIN
    image, target = bundle.val_plain[0]
    assert image.shape == (3, 32, 32) and target == -1
    crops, target = bundle.train_aug[0]
    assert len(crops) == 4 and target == -1


def test_unlabelled_folder_skips_unreadable_files_with_one_warning(tmp_path):
    root = nested_photos(tmp_path / "photos", 20)
    (root / "top" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.warns(D.DataWarning) as record:
        bundle = D.build_datasets(root, tiny_aug(), 32)
    assert len(record) == 1 and "broken.jpg" in str(record[0].message)
    assert len(bundle.train_plain) + len(bundle.val_plain) == 20


@pytest.mark.parametrize("content", ["empty", "no images", "only unreadable"])
def test_folder_without_images_is_one_clear_error(tmp_path, content):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    if content == "no images":
        (root / "sub" / "readme.txt").write_text("hello")
    if content == "only unreadable":
        (root / "sub" / "bad.png").write_bytes(b"nope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", D.DataWarning)
        with pytest.raises(
            FileNotFoundError, match=r"photos.*(holds no images|no readable images)"
        ):
            D.build_datasets(root, tiny_aug(), 32)
