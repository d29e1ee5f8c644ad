import io
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from dino_nb.augment import DataAugmentation
from dino_nb.notebook import curves
from dino_nb.notebook import figures as viz
from dino_nb.notebook.views import crop_grid, record_views, view_labels


def render(fig, n_axes):
    assert isinstance(fig, Figure)
    assert len(fig.axes) == n_axes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)
    assert buf.getvalue()[:4] == b"\x89PNG"


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(8)
    x = torch.randn(3, 60, generator=g)[y] * 3 + torch.randn(24, 60, generator=g)
    imgs = torch.rand(24, 3, 16, 16, generator=g)
    return x, y, imgs


def test_to_hwc_accepts_tensor_array_pil():
    t = torch.rand(3, 5, 7)
    assert viz.to_hwc(t).shape == (5, 7, 3)
    assert viz.to_hwc(np.zeros((5, 7, 3), dtype=np.uint8)).max() == 0
    assert viz.to_hwc(Image.new("L", (7, 5), 255)).shape == (5, 7, 3)
    with pytest.raises(ValueError):
        viz.to_hwc(np.zeros((2, 5, 7, 3)))


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embedding_map(feats, method):
    x, y, imgs = feats
    render(viz.embedding_map(x, y, ["a", "b", "c"], images=imgs, method=method, n_thumbnails=5), 1)


def test_project_2d_small_sets_and_errors():
    x = torch.randn(5, 4)
    assert viz.project_2d(x, "tsne", perplexity=30).shape == (5, 2)  # perplexity capped below n
    with pytest.raises(ValueError):
        viz.project_2d(x, "umap")
    with pytest.raises(ValueError):
        viz.project_2d(x[:1], "pca")


def test_neighbours_grid(feats):
    from dino_nb.evaluation import nearest_neighbours

    x, y, imgs = feats
    sims, idx = nearest_neighbours(x, x[:2], k=3)
    render(viz.neighbours_grid(list(imgs[:2]), y[:2], imgs, y, sims, idx, ["a", "b", "c"]), 2 * 4)
    with pytest.raises(ValueError):
        viz.neighbours_grid(list(imgs[:1]), y[:2], imgs, y, sims, idx)


def test_confusion_matrix():
    fig = viz.confusion_matrix_figure([0, 1, 2, 2], [0, 2, 2, 2], ["a", "b", "c", "d"])
    render(fig, 2)  # matrix + colour bar
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (4, 4)
    assert image[2, 2] == 1.0 and image[1, 2] == 1.0 and image[1, 1] == 0.0


def test_attention_grid():
    maps = torch.rand(3, 4, 4)
    render(viz.attention_grid(torch.rand(3, 32, 32), maps, title="x"), 2 * 4)
    render(viz.attention_grid(Image.new("RGB", (32, 32)), maps, threshold=None, mode="bilinear"), 4)


def test_training_curves(tmp_path):
    lines = [
        {"step": 0, "epoch": 0, "loss": 5.0, "lr": 0.0, "momentum": 0.996, "knn_top1": 0.1},
        {"step": 1, "epoch": 0, "loss": 4.0, "lr": 1e-4, "momentum": 0.997},
        {"step": 2, "epoch": 0, "loss": 3.5, "lr": 2e-4, "momentum": 0.998, "knn_top1": 0.3},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 3, "lo')  # cut short
    render(curves.training_curves(path), 4)  # loss, lr, momentum, knn_top1; wd/teacher_temp absent
    render(curves.training_curves(tmp_path), 4)  # a run folder
    render(curves.training_curves([{"step": 0}]), 1)  # nothing to plot yet
    with pytest.raises(FileNotFoundError):
        curves.training_curves(tmp_path / "missing.jsonl")


def test_crop_grid():
    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    views = record_views(DataAugmentation(n_local_crops=3, global_size=32, local_size=16), img)
    assert view_labels(views) == ["G1", "G2", "L1", "L2", "L3"]
    render(crop_grid(views), 5)
    render(crop_grid(views, ncols=2), 5)


def test_schedules_figure_draws_every_schedule_per_run():
    from dino_nb.step import Schedules
    from dino_nb.tools.presets import preset

    cfg = preset("imagenette", epochs=10, warmup_epochs=2, warmup_teacher_temp_epochs=3)
    fig = curves.schedules_figure({"a": Schedules(cfg, 100, 256), "b": Schedules(cfg, 40, 256)})
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [
        "learning rate",
        "weight decay",
        "teacher momentum",
        "teacher temperature",
    ]
    for ax in axes:
        assert len(ax.lines) == 2
        assert ax.lines[0].get_xdata()[-1] == pytest.approx(0.99)  # fraction of the run
    with pytest.raises(ValueError):
        curves.schedules_figure({})
