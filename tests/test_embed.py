"""Embedding a folder of images, its cache, search and the command line (tiny ViT, CPU)."""

from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import write_image

from dino_nb.checkpoint import save_atomic
from dino_nb.datasets import DataWarning
from dino_nb.model import student_teacher_from_config
from dino_nb.tools import embed as E
from dino_nb.tools.presets import preset

TINY_MODEL = dict(
    model="vit_tiny_patch16_224",
    model_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 2},
    global_size=32,
    out_dim=64,
    hidden_dim=32,
    bottleneck_dim=16,
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training checkpoint of a tiny, randomly initialised ViT."""
    cfg = preset("cpu", **TINY_MODEL)
    torch.manual_seed(0)
    student, teacher = student_teacher_from_config(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pth"
    state = {"student": student.state_dict(), "teacher": teacher.state_dict()}
    return save_atomic({**state, "config": cfg.to_dict(), "step": 0}, path)


def photos(root: Path, n: int = 11) -> Path:
    for i in range(n):
        sub = ("a/b", "a", "c")[i % 3]
        write_image(root / sub / f"img{i:02d}.jpg", size=(40, 30), seed=i)
    return root


class Counting(torch.nn.Module):
    """A backbone that counts the images it embeds."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone, self.seen = backbone, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.backbone(x)


def counting_model(checkpoint: Path) -> E.Model:
    model = E.load_model(checkpoint)
    model.backbone = Counting(model.backbone)
    return model


def test_row_i_is_image_i_and_files_are_written(checkpoint: Path, tmp_path: Path) -> None:
    data, out = photos(tmp_path / "photos"), tmp_path / "emb"
    model = E.load_model(checkpoint)
    emb = E.embed_folder(model, data, out, batch_size=4, progress=False)
    assert emb.paths == sorted(emb.paths) and len(emb.paths) == 11 and "a/b/img00.jpg" in emb.paths
    saved = np.load(out / E.EMBEDDINGS)
    assert saved.dtype == np.float32 and saved.shape == (11, 48)
    np.testing.assert_allclose(np.linalg.norm(saved, axis=1), 1.0, rtol=1e-5)
    with open(out / E.INDEX, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["row"]), r["path"]) for r in rows] == list(enumerate(emb.paths))
    for i in (0, 5, 10):  # row i is the embedding of image i alone
        alone = E.embed_image(model, data / emb.paths[i])
        np.testing.assert_allclose(saved[i], alone / np.linalg.norm(alone), atol=1e-5)
    again = E.read_embeddings(out)
    assert again.paths == emb.paths and np.array_equal(again.features, saved) and again.normalized
    raw = E.embed_folder(model, data, tmp_path / "raw", normalize=False, progress=False)
    np.testing.assert_allclose(
        raw.features[5], E.embed_image(model, data / emb.paths[5]), atol=1e-5
    )


def test_cache_gives_identical_arrays_and_re_embeds_changed_files(
    checkpoint: Path, tmp_path: Path
) -> None:
    data, out = photos(tmp_path / "photos"), tmp_path / "emb"
    model = counting_model(checkpoint)
    first = E.embed_folder(model, data, out, batch_size=4, progress=False)
    assert model.backbone.seen == 11
    second = E.embed_folder(model, data, out, batch_size=4, progress=False)
    assert model.backbone.seen == 11  # everything from the cache
    assert np.array_equal(first.features, second.features)

    changed = data / "c" / "img02.jpg"
    row = first.paths.index("c/img02.jpg")
    write_image(changed, size=(40, 30), seed=99)  # new content; force a new mtime too
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    write_image(data / "new.jpg", size=(40, 30), seed=7)
    third = E.embed_folder(model, data, out, batch_size=4, progress=False)
    assert model.backbone.seen == 13  # the changed file and the new one only
    assert len(third.paths) == 12
    fresh = E.embed_folder(E.load_model(checkpoint), data, None, progress=False)  # no cache
    np.testing.assert_allclose(third.features, fresh.features, atol=1e-6)
    new_row = third.paths.index("c/img02.jpg")
    assert not np.allclose(third.features[new_row], first.features[row])


def test_cache_of_other_weights_is_not_used(checkpoint: Path, tmp_path: Path) -> None:
    data, out = photos(tmp_path / "photos", 4), tmp_path / "emb"
    E.embed_folder(counting_model(checkpoint), data, out, progress=False)
    other = counting_model(checkpoint)
    other.identity = "another checkpoint"
    E.embed_folder(other, data, out, progress=False)
    assert other.backbone.seen == 4


def test_search_finds_the_image_itself_first(checkpoint: Path, tmp_path: Path) -> None:
    data = photos(tmp_path / "photos")
    model = E.load_model(checkpoint)
    emb = E.embed_folder(model, data, None, progress=False)
    for path in ("a/img01.jpg", "c/img05.jpg"):
        matches = E.search(emb, data / path, top=4)
        assert matches[0].path == path and matches[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert len(matches) == 4
        assert [m.similarity for m in matches] == sorted(
            (m.similarity for m in matches), reverse=True
        )
    outside = write_image(
        tmp_path / "elsewhere" / "q.jpg", size=(40, 30), seed=3
    )  # = img03.jpg's pixels
    matches = E.search(emb, outside, top=2, model=model)
    assert matches[0].path == "a/b/img03.jpg" and matches[0].similarity == pytest.approx(
        1.0, abs=1e-5
    )
    with pytest.raises(ValueError, match="pass the model"):
        E.search(emb, outside, top=2)


def test_unreadable_files_are_skipped_with_one_warning(checkpoint: Path, tmp_path: Path) -> None:
    data = photos(tmp_path / "photos", 5)
    (data / "a" / "broken.jpg").write_bytes(b"\xff\xd8 broken")
    with pytest.warns(DataWarning) as record:
        emb = E.embed_folder(checkpoint, data, None, progress=False)
    assert len(record) == 1 and "broken.jpg" in str(record[0].message)
    assert len(emb.paths) == 5


def test_cli_embeds_searches_and_writes_a_contact_sheet(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data, out = photos(tmp_path / "photos"), tmp_path / "emb"
    sheet = tmp_path / "sheet.png"
    args = ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out)]
    query = ["--query", str(data / "a/img04.jpg"), "--top", "3", "--sheet", str(sheet)]
    assert E.main([*args, *query, "--no-progress", "--batch-size", "5", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    lines = [line.split() for line in printed.splitlines() if line.startswith("  ")]
    assert [p for _, p in lines][0] == "a/img04.jpg" and len(lines) == 3
    assert float(lines[0][0]) == pytest.approx(1.0, abs=1e-3)
    assert sheet.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / E.EMBEDDINGS).is_file() and (out / E.INDEX).is_file()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "image folder not found"),
        ("empty", "holds no images"),
        ("not an image", "holds no images"),
        ("no model", "neither a checkpoint file nor a timm model name"),
        ("not a checkpoint", "not a dino_nb training checkpoint"),
        ("bad query", "query image not found"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str, message: str
) -> None:
    data = tmp_path / "photos"
    data.mkdir()
    ckpt, extra = str(checkpoint), []
    if case == "missing":
        data = tmp_path / "nowhere"
    elif case == "not an image":
        (data / "sub").mkdir()
        (data / "sub" / "notes.txt").write_text("hi")
    elif case == "no model":
        ckpt = "no_such_model_or_file"
    elif case == "not a checkpoint":
        ckpt = str(save_atomic({"weights": torch.zeros(1)}, tmp_path / "other.pth"))
    elif case == "bad query":
        photos(data, 2)
        extra = ["--query", str(tmp_path / "missing.jpg")]
    argv = ["--checkpoint", ckpt, "--data", str(data), "--out", str(tmp_path / "o"), *extra]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert E.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_pretrained_timm_name_that_cannot_download_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """No network in the tests: the download is replaced by the error it raises offline."""
    import dino_nb.model as models

    def offline(name: str, pretrained: bool = False, **kwargs):
        assert pretrained
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models, "build_backbone", offline)
    with pytest.raises(RuntimeError, match="could not load the pretrained weights"):
        E.load_model("vit_small_patch16_224.augreg_in21k")
    data = photos(tmp_path / "photos", 2)
    argv = [
        "--checkpoint",
        "vit_small_patch16_224",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "o"),
    ]
    assert E.main(argv) == 2
    assert "check the network" in capsys.readouterr().err
