"""Notebook 05's before/after comparisons, and its photo section run on the built-in data."""

import json
import shutil
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from test_loop import tiny_config, tiny_data  # noqa: F401  (a fixture)

from dino_nb.loop import train
from dino_nb.notebook import compare
from dino_nb.notebook.compare import (
    RANDOM,
    TRAINED,
    attention_side_by_side,
    maps_side_by_side,
    neighbours_side_by_side,
    network_pair,
    photo_checkpoint,
    run_data,
    same_class_share,
)
from dino_nb.sources import PALETTES, palette_of, render
from dino_nb.step import build_run

matplotlib.use("Agg")
NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "05_knn_and_embeddings.ipynb"


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("runs") / "photos-cls"
    train(tiny_config(tiny_data, out, max_steps=3))
    return out


def test_network_pair_is_the_run_before_its_first_step_and_its_teacher_after(tiny_run):
    pair = network_pair(tiny_run / "checkpoint.pth")
    assert pair.steps == 3 and list(pair.networks) == [RANDOM, TRAINED]
    start = build_run(pair.cfg).teacher.backbone.state_dict()  # what train() started from
    random, trained = (pair.networks[n].state_dict() for n in (RANDOM, TRAINED))
    saved = torch.load(tiny_run / "checkpoint.pth", map_location="cpu", weights_only=True)
    teacher = {
        k.removeprefix("backbone."): v
        for k, v in saved["teacher"].items()
        if k.startswith("backbone.")
    }
    assert all(torch.equal(random[k], start[k]) for k in start)
    assert all(torch.equal(trained[k], teacher[k]) for k in teacher)
    assert not torch.equal(random["cls_token"], trained["cls_token"])  # three steps moved it


def test_photo_checkpoint_is_none_without_a_run(tmp_path, tiny_run):
    assert photo_checkpoint(tmp_path) is None
    assert photo_checkpoint(tiny_run) == tiny_run / "checkpoint.pth"


def test_run_data_finds_a_relative_folder_from_the_top_of_the_repository(
    tmp_path, monkeypatch, tiny_run
):
    cfg = network_pair(tiny_run / "checkpoint.pth").cfg
    top = tmp_path / "repo"
    (top / "photos" / "train" / "a").mkdir(parents=True)
    (top / "photos" / "val" / "a").mkdir(parents=True)
    (top / "notebooks").mkdir()
    monkeypatch.chdir(top / "notebooks")  # where a notebook runs
    monkeypatch.setattr(compare, "_checkout_root", lambda: top)
    assert run_data(cfg.__class__.from_dict({**cfg.to_dict(), "data": "photos"})) == top / "photos"
    with pytest.raises(FileNotFoundError, match="ImageNette not found"):
        monkeypatch.setenv("DINO_NB_DATA", str(tmp_path / "nowhere"))
        run_data(cfg.__class__.from_dict({**cfg.to_dict(), "data": "gone"}))


def test_same_class_share_counts_neighbours_of_the_query_class():
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    # query 0's 2 nearest: bank 0 (class 0) and 1 (class 1); query 1's: bank 2 and 3 (class 1)
    assert same_class_share(bank, labels, query, torch.tensor([0, 1]), k=2) == pytest.approx(3 / 4)


@pytest.mark.parametrize("seed", range(40))
def test_palette_of_recovers_the_colour_scheme_an_image_was_drawn_in(seed):
    drawn = int(np.random.default_rng(seed).integers(len(PALETTES)))  # render's first draw
    image = render(seed % 10, np.random.default_rng(seed))
    expected = 0 if drawn == 1 else drawn  # 0 and 1 are the same two colours, swapped
    assert palette_of(image) == expected
    assert palette_of(np.asarray(image) / 255.0) == expected  # floats in [0, 1] too


def test_side_by_side_figures_have_a_panel_per_network():
    images = torch.rand(3, 3, 16, 16)
    features = {RANDOM: torch.randn(12, 8), TRAINED: torch.randn(12, 8)}
    fig = maps_side_by_side(
        features, torch.arange(12) % 3, ["a", "b", "c"], [images[0]] * 12, method="pca"
    )
    assert [ax.get_title() for ax in fig.axes] == [RANDOM, TRAINED]
    near = {RANDOM: torch.tensor([[0, 1], [2, 0]]), TRAINED: torch.tensor([[1, 1], [0, 2]])}
    fig = neighbours_side_by_side(
        images[:2], [0, 1], images, torch.tensor([0, 1, 1]), near, ["a", "b"]
    )
    assert len(fig.axes) == 2 * (1 + 1 + 2 + 1 + 2)  # query, a gap, 2 neighbours, a gap, 2 more
    maps = {RANDOM: torch.rand(2, 4, 2, 2), TRAINED: torch.rand(2, 4, 2, 2)}
    fig = attention_side_by_side(images[:2], maps, ["x", "y"])
    assert len(fig.axes) == 2 * 2 * (1 + 4)  # per image and network: the image and 4 heads


def _cells(source_has: str) -> list[str]:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return [
        "".join(c["source"])
        for c in cells
        if c["cell_type"] == "code" and source_has in "".join(c["source"])
    ]


def test_notebook_photo_cells_run_on_the_built_in_data(tiny_run, tmp_path, monkeypatch):
    """The cells that show the ImageNette run, executed on a run on the built-in shapes."""
    shutil.copytree(tiny_run, tmp_path / "photos-cls")
    monkeypatch.setenv("DINO_NB_RUNS", str(tmp_path))
    shown = []
    namespace = {
        "display": shown.append,
        "PROFILE": type("P", (), {"device": "cpu", "is_ci": True})(),
    }
    imports = _cells("from dino_nb.notebook.compare import")
    photo_cells = _cells("PHOTOS")
    assert len(imports) == 1 and len(photo_cells) >= 4
    for source in imports + photo_cells:
        exec(compile(source.replace("# NBVAL_IGNORE_OUTPUT", ""), "cell", "exec"), namespace)
    assert namespace["PHOTOS"].resolve() == tmp_path / "photos-cls" / "checkpoint.pth"
    assert len(shown) == 3  # neighbours, maps, attention
    assert namespace["p_maps"][TRAINED].shape[-2:] == (16, 16)  # 128-pixel inputs, 8-pixel patches
