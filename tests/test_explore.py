import math
import os
from dataclasses import replace
from pathlib import Path

import matplotlib
import pytest
import torch
from PIL import Image

matplotlib.use("Agg")

from dino_nb.notebook import explore  # noqa: E402
from dino_nb.notebook.explore import (
    Profile,
    attention_explorer,
    detect_platform,
    finished_run,
    light_figures,
    pick_profile,
    relative,
    runs_dir,
    sample_photos,
    temperature_figure,
    tempered_softmax,
    training_config,
)
from dino_nb.notebook.views import (
    crop_explorer,
    draw_views,
    image_row,
    single_augmentations,
    steps_figure,
)


def _image(w=80, h=60):
    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


# ---------------------------------------------------------------- profile


def test_profile_env_wins_and_ci_sets_one_thread():
    threads = torch.get_num_threads()
    try:
        p = pick_profile({"DINO_NB_PROFILE": "CI"}, {}, cuda_available=True)
        assert p == Profile("ci", "local", "cpu") and p.is_ci
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_profile_from_hardware_and_platform():
    assert pick_profile({}, {}, cuda_available=True, apply=False) == Profile("gpu", "local", "cuda")
    assert pick_profile({}, {}, cuda_available=False, apply=False).name == "cpu"
    kaggle = pick_profile(
        {"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, {}, cuda_available=True, apply=False
    )
    assert (kaggle.name, kaggle.platform) == ("gpu", "kaggle")
    colab = pick_profile({}, {"google.colab": object()}, cuda_available=False, apply=False)
    assert (colab.name, colab.platform) == ("cpu", "colab")


def test_profile_errors():
    with pytest.raises(ValueError, match="not a profile"):
        pick_profile({"DINO_NB_PROFILE": "tpu"}, {}, cuda_available=False)
    with pytest.raises(ValueError, match="no CUDA"):
        pick_profile({"DINO_NB_PROFILE": "gpu"}, {}, cuda_available=False)


def test_detect_platform_defaults_to_local():
    assert detect_platform({}, {}) == "local"
    assert detect_platform({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, {"google.colab": 1}) == "kaggle"


def test_runs_dir_is_relative_and_checked(tmp_path, monkeypatch):
    monkeypatch.delenv("DINO_NB_RUNS", raising=False)
    monkeypatch.chdir(tmp_path)
    d = runs_dir("nb")
    assert not d.is_absolute() and d.parts[-2:] == ("runs", "nb")
    with pytest.raises(ValueError, match="plain folder name"):
        runs_dir("a/b")
    assert relative(tmp_path / "x") == Path("x")
    monkeypatch.setenv("DINO_NB_RUNS", str(tmp_path / "elsewhere"))
    assert runs_dir("nb") == Path("elsewhere/nb")


def test_training_config_per_profile(monkeypatch):
    from dino_nb.tools.presets import preset

    ci = training_config(Profile("ci", "local", "cpu"), "runs/x")
    base = preset("cpu")
    # the whole cpu recipe, a fixed number of steps (no time budget): the same on every CPU
    assert ci.max_steps is None and ci.minutes is None
    assert ci.eval_every == explore.CI_EVAL_EVERY and ci.out == "runs/x"
    assert (ci.model, ci.model_kwargs, ci.data) == (base.model, base.model_kwargs, base.data)

    def missing(*a, **k):
        raise FileNotFoundError("no")

    monkeypatch.setattr("dino_nb.sources.find_imagenette", missing)
    cpu = training_config(Profile("cpu", "local", "cpu"), "o", seed=3)
    assert explore.training_preset(Profile("cpu", "local", "cpu")) == "cpu"
    assert cpu.max_steps is None and cpu.seed == 3 and cpu.eval_every == base.eval_every
    assert cpu.data == base.data
    gpu = training_config(Profile("gpu", "local", "cuda"), "o")
    assert gpu.device == "cuda" and gpu.data == base.data
    monkeypatch.setattr("dino_nb.sources.find_imagenette", lambda *a, **k: Path("x"))
    photos = training_config(Profile("cpu", "local", "cpu"), "o")
    recipe = preset("cpu-photos")
    assert photos.data == "imagenette" and photos.use_bn_in_head and photos.minutes == 15
    # the photo recipe, except for the embedding: the [CLS] token, whose attention notebook 05 shows
    assert photos.model_kwargs == {**recipe.model_kwargs, "global_pool": "token"}
    assert recipe.model_kwargs["global_pool"] == "avg"
    assert photos == preset("cpu-photos-cls", out="o")  # the named preset, nothing on top
    assert explore.training_preset(Profile("cpu", "local", "cpu")) == "cpu-photos-cls"
    assert explore.training_preset(Profile("ci", "local", "cpu")) == "cpu"  # photos or not
    import dino_nb.tools.cli as cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "gpu_memory_gib", lambda: 80.0)
    big = training_config(Profile("gpu", "local", "cuda"), "o")
    assert big.data == "imagenette" and big.model == preset("imagenette").model
    assert big.minutes == explore.GPU_MINUTES  # a stated time on a GPU, not the preset's epochs
    monkeypatch.setattr(cli, "gpu_memory_gib", lambda: 14.7)  # a T4
    small = training_config(Profile("gpu", "local", "cuda"), "o")
    assert small.data == "imagenette" and small.model == preset("t4").model
    assert small.minutes == explore.GPU_MINUTES
    assert explore.training_preset(Profile("gpu", "local", "cuda")) == "t4"


# ---------------------------------------------------------------- images and crops


def test_sample_photos_ship_with_sklearn():
    photos = sample_photos()
    assert [n for n, _ in photos] == ["china", "flower"]
    assert all(img.mode == "RGB" and img.size == (320, 214) for _, img in photos)
    assert sample_photos(None)[0][1].size == (640, 427)


def test_sample_images_ci_uses_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("DINO_NB_DATA", str(tmp_path))
    imgs = explore.sample_images(Profile("ci", "local", "cpu"), photos=False)
    assert len(imgs) == 10 and imgs[0][0] == "checker"
    assert all(img.mode == "RGB" for _, img in imgs)
    with pytest.raises(ValueError):
        explore.sample_images(Profile("ci", "local", "cpu"), per_class=0)


def test_draw_views_is_seeded_and_leaves_global_rng_alone():
    img = _image()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    views = draw_views(img, seed=1, n_local_crops=3, global_size=32, local_size=16)
    after = torch.rand(1)
    assert torch.equal(before, after)
    views2 = draw_views(img, seed=1, n_local_crops=3, global_size=32, local_size=16)
    assert [v.box for v in views] == [v.box for v in views2]
    assert [v.kind for v in views] == ["global"] * 2 + ["local"] * 3
    assert [v.image.size for v in views] == [(32, 32)] * 2 + [(16, 16)] * 3
    assert all(
        v.steps for v in draw_views(img, seed=1, n_local_crops=1, global_size=16, record_steps=True)
    )


def test_crop_explorer_draws_one_box_per_view():
    fig = crop_explorer(_image(), seed=1, n_local_crops=3, global_size=32, local_size=16)
    boxes = fig.subfigs[0].axes[0]
    assert len(boxes.patches) == 5
    assert [t.get_text() for t in boxes.texts] == ["G1", "G2", "L1", "L2", "L3"]
    views = draw_views(_image(), seed=1, n_local_crops=3, global_size=32, local_size=16)
    left, top, right, bottom = views[2].box
    rect = boxes.patches[2]
    assert (rect.get_x(), rect.get_y(), rect.get_width(), rect.get_height()) == (
        left,
        top,
        right - left,
        bottom - top,
    )
    titles = [ax.get_title() for ax in fig.subfigs[1].axes if ax.get_title()]
    assert titles == ["G1: 32px", "G2: 32px", "L1: 16px", "L2: 16px", "L3: 16px"]


def test_draw_views_scale_bounds_box_area():
    img = _image(200, 200)
    views = draw_views(
        img, seed=0, global_scale=(0.9, 1.0), local_scale=(0.05, 0.1), n_local_crops=4
    )
    for v in views:
        x0, y0, x1, y1 = v.box
        frac = (x1 - x0) * (y1 - y0) / (200 * 200)
        lo, hi = (0.9, 1.0) if v.kind == "global" else (0.05, 0.1)
        assert lo * 0.9 <= frac <= hi * 1.1


def test_single_augmentations():
    out = single_augmentations(_image(), size=24)
    names = [n for n, _ in out]
    assert names[0] == "centre crop" and "grayscale" in names and len(out) == 9
    assert all(img.size == (24, 24) for _, img in out)
    base, flipped = out[0][1], out[1][1]
    assert flipped.transpose(Image.FLIP_LEFT_RIGHT).tobytes() == base.tobytes()
    gray = dict(out)["grayscale"]
    r, g, b = gray.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()
    with pytest.raises(ValueError):
        single_augmentations(_image(), size=0)


def test_image_row_and_steps_figure():
    fig = image_row([("a", _image()), ("b", _image())])
    assert [ax.get_title() for ax in fig.axes] == ["a", "b"]
    with pytest.raises(ValueError):
        image_row([])
    views = draw_views(_image(), n_local_crops=1, global_size=16, local_size=8, record_steps=True)
    fig = steps_figure(views)
    assert len(fig.axes) == 3 * max(len(v.steps) for v in views)
    with pytest.raises(ValueError, match="record_steps"):
        steps_figure(draw_views(_image(), n_local_crops=0, global_size=16))


# ---------------------------------------------------------------- temperature


def test_tempered_softmax_against_hand_values():
    logits = torch.tensor([1.0, 0.0])
    p = tempered_softmax(logits, 0.5)
    assert torch.allclose(p, torch.tensor([math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)]))
    assert torch.allclose(
        tempered_softmax(logits, 1.0, center=torch.tensor([1.0, 0.0])), torch.tensor([0.5, 0.5])
    )
    # lower temperature = lower entropy
    x = torch.randn(16, generator=torch.Generator().manual_seed(0))

    def h(q):
        return float(-(q * q.log()).sum())

    assert h(tempered_softmax(x, 0.04)) < h(tempered_softmax(x, 0.1)) < h(tempered_softmax(x, 1.0))
    with pytest.raises(ValueError):
        tempered_softmax(x, 0.0)


def test_temperature_figure():
    fig = temperature_figure(torch.randn(8), 0.04)
    assert len(fig.axes) == 3 and "0.04" in fig.axes[2].get_title()
    with pytest.raises(ValueError):
        temperature_figure(torch.randn(2, 8), 0.1)


# ---------------------------------------------------------------- attention


def test_attention_explorer():
    maps = torch.rand(2, 3, 4, 4)
    imgs = torch.rand(2, 3, 32, 32)
    fig = attention_explorer(imgs, maps, index=1, head=1, threshold=0.5, names=["a", "b"])
    assert (
        len(fig.axes) == 3
        and fig.axes[0].get_title() == "b"
        and fig.axes[1].get_title() == "head 1"
    )
    fig = attention_explorer(imgs, maps, head=-1)
    assert fig.axes[1].get_title() == "mean of heads" and fig.axes[0].get_title() == "image 0"
    # a one-hot map keeps exactly one patch
    one = torch.zeros(1, 1, 4, 4)
    one[0, 0, 2, 3] = 1
    assert "1 of 16 patches" in attention_explorer(imgs[:1], one, head=0).axes[2].get_title()
    # the mean over heads is what the mask is computed on
    two = torch.zeros(1, 2, 2, 2)
    two[0, 0, 0, 0] = 1
    two[0, 1, 1, 1] = 1
    assert (
        "2 of 4 patches"
        in attention_explorer(imgs[:1], two, head=-1, threshold=0.9).axes[2].get_title()
    )
    with pytest.raises(ValueError, match="head"):
        attention_explorer(imgs, maps, head=3)
    with pytest.raises(ValueError, match="index"):
        attention_explorer(imgs, maps, index=2)
    with pytest.raises(ValueError, match="same n"):
        attention_explorer(imgs, maps[0], head=0)


def test_profile_env_name_constant():
    assert explore.PROFILE_ENV == "DINO_NB_PROFILE"
    assert os.environ.get("DINO_NB_PROFILE", "ci") in explore.PROFILES


def test_light_figures_outside_and_inside_ipython():
    light_figures()  # plain pytest: no shell, nothing to set, no error
    with pytest.raises(ValueError):
        light_figures(quality=100)
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        light_figures(dpi=50)
        fig = image_row([("a", _image()), ("b", _image())])
        data, _ = shell.display_formatter.format(fig)
        assert "image/jpeg" in data and "image/png" not in data
    finally:
        InteractiveShell.clear_instance()


def test_finished_run_compares_settings_not_places(tmp_path):
    from dino_nb.checkpoint import save_atomic
    from dino_nb.tools.presets import preset

    cfg = preset("cpu", minutes=None, out=str(tmp_path / "a"))
    path = tmp_path / "checkpoint.pth"
    assert not finished_run(path, cfg)
    assert cfg.gpu_augment == "auto"  # train() saves it decided, as True or False
    save_atomic(
        {"config": {**cfg.to_dict(), "gpu_augment": False}, "step": 372, "total_steps": 372}, path
    )
    assert finished_run(path, cfg)
    assert not finished_run(path, replace(cfg, gpu_augment=True))  # told to, not decided
    assert finished_run(path, replace(cfg, out="elsewhere", progress=False))
    assert not finished_run(path, replace(cfg, seed=1))
    save_atomic({"config": cfg.to_dict(), "step": 186, "total_steps": 372}, path)
    assert not finished_run(path, cfg)  # stopped half-way


def test_training_plan_states_the_budget_or_the_epochs() -> None:
    from dino_nb.notebook.explore import training_plan
    from dino_nb.tools.presets import preset

    timed = training_plan(preset("t4", minutes=20.0, out="runs/x", device="cpu"), 74)
    assert "at most 20 minutes" in timed and "resumes from runs/x" in timed
    fixed = training_plan(preset("cpu", out="runs/y", device="cpu"), 31)
    assert "12 epochs of 31 steps, no time budget" in fixed
    assert "12 epochs, no time budget" in training_plan(preset("cpu", out="z", device="cpu"))


def test_runs_dir_is_the_checkouts_runs_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    """From a checkout, runs land in <checkout>/runs whatever the module's depth in the package."""
    monkeypatch.delenv("DINO_NB_RUNS", raising=False)
    checkout = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(checkout / "notebooks")
    assert explore.runs_dir("x") == Path("../runs/x")
