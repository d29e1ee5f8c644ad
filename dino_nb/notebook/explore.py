"""What the notebooks' widgets call: the run profile, sample images, and interactive figures.

Every function behind a slider lives here (and has a unit test), so the notebooks only
import, call and wrap them in ``ipywidgets.interact``. Figures are ``matplotlib`` figures,
returned and never shown here (the notebook displays them, as JPEG after :func:`light_figures`).

The **profile** decides how big the notebooks' runs are:

* ``ci``: the committed outputs and ``pytest --nbval``; the ``cpu`` recipe for a fixed number of
  steps, deterministic, one CPU thread.
* ``cpu``: a laptop or a CPU-only Colab/Kaggle session; the ``cpu`` preset in full.
* ``gpu``: a CUDA GPU (Colab, Kaggle); ImageNette and the paper-sized preset when the data
  is found, the ``cpu`` preset on the GPU otherwise.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from matplotlib.figure import Figure
from PIL import Image

from ..config import TrainConfig
from ..distributed import pick_device
from ..tools.cli import auto_preset
from ..tools.memory import memory_line
from ..tools.presets import preset
from .attention import threshold_mask, upsample
from .figures import new_figure, to_hwc

ProfileName = Literal["ci", "cpu", "gpu"]
#: The environment variable that forces a profile (the root ``conftest.py`` sets ``ci``).
PROFILE_ENV = "DINO_NB_PROFILE"
PROFILES: tuple[str, ...] = ("ci", "cpu", "gpu")
#: The environment variable naming the folder that holds the notebooks' runs (default ``runs/``).
RUNS_ENV = "DINO_NB_RUNS"
#: Minutes a notebook trains for on a GPU (a time budget: the schedules fit into it, and
#: running the cell again resumes an interrupted run).
GPU_MINUTES = 20.0
#: Steps between kNN evaluations in the ``ci`` profile (the ``cpu`` recipe is 372 steps).
CI_EVAL_EVERY = 93
#: Fields of a :class:`~dino_nb.config.TrainConfig` that say where a run lives and how it
#: reports, not what it computes: :func:`finished_run` ignores them.
WHERE_FIELDS = ("out", "tensorboard_dir", "resume", "progress")


# --------------------------------------------------------------------------- profile


@dataclass(frozen=True)
class Profile:
    """Where a notebook runs and how big its work is.

    Attributes:
        name: ``"ci"``, ``"cpu"`` or ``"gpu"``.
        platform: ``"colab"``, ``"kaggle"`` or ``"local"``.
        device: ``"cuda"`` or ``"cpu"``.
    """

    name: ProfileName
    platform: str
    device: str

    @property
    def is_ci(self) -> bool:
        """The small, deterministic configuration of the committed outputs."""
        return self.name == "ci"


def detect_platform(
    environ: Mapping[str, str] | None = None, modules: Mapping[str, Any] | None = None
) -> str:
    """``"kaggle"`` (``KAGGLE_KERNEL_RUN_TYPE`` set), ``"colab"`` (``google.colab`` imported) or ``"local"``."""
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if environ.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "kaggle"
    if "google.colab" in modules:
        return "colab"
    return "local"


def pick_profile(
    environ: Mapping[str, str] | None = None,
    modules: Mapping[str, Any] | None = None,
    cuda_available: bool | None = None,
    apply: bool = True,
) -> Profile:
    """Choose the notebook profile from the environment and the hardware.

    ``$DINO_NB_PROFILE`` wins when set (``ci``, ``cpu`` or ``gpu``); otherwise ``gpu`` when
    CUDA is available, else ``cpu``. Colab and Kaggle are detected for the platform field
    only (their GPU sessions get ``gpu`` like any other machine).

    Args:
        environ: environment variables; default ``os.environ``.
        modules: imported modules; default ``sys.modules``.
        cuda_available: default: :func:`~dino_nb.distributed.pick_device` finds CUDA.
        apply: in ``ci``, limit torch to one CPU thread so that printed numbers repeat
            exactly from machine to machine.

    Raises:
        ValueError: for an unknown ``$DINO_NB_PROFILE``, or ``gpu`` without a GPU.
    """
    environ = os.environ if environ is None else environ
    cuda = pick_device("auto").type == "cuda" if cuda_available is None else cuda_available
    requested = environ.get(PROFILE_ENV, "").strip().lower()
    if requested and requested not in PROFILES:
        raise ValueError(
            f"${PROFILE_ENV}={requested!r} is not a profile; use one of {', '.join(PROFILES)}"
        )
    if requested == "gpu" and not cuda:
        raise ValueError(f"${PROFILE_ENV}=gpu but no CUDA GPU is available; use cpu")
    name = requested or ("gpu" if cuda else "cpu")
    profile = Profile(
        name=name,
        platform=detect_platform(environ, modules),
        device="cuda" if name == "gpu" else "cpu",
    )  # type: ignore[arg-type]
    if apply and profile.is_ci:
        torch.set_num_threads(1)
    return profile


def light_figures(dpi: int = 80, quality: int = 80) -> None:
    """Show this notebook's figures as JPEG at a modest resolution, so the notebook stays small.

    A figure full of photographs is several times smaller as JPEG than as PNG, and strict
    nbval skips ``image/jpeg`` exactly as it skips ``image/png``. Applies to every figure the
    kernel displays afterwards, widgets' outputs included. Outside IPython it does nothing.

    Args:
        dpi: pixels per inch of the rendered figures (matplotlib's default is 100).
        quality: JPEG quality, 1-95.
    """
    if not 0 < dpi or not 1 <= quality <= 95:
        raise ValueError(f"need dpi > 0 and quality in [1, 95], got {dpi} and {quality}")
    from IPython import get_ipython

    if get_ipython() is None:
        return  # a script or a test: figures are not displayed
    from matplotlib_inline.backend_inline import set_matplotlib_formats

    set_matplotlib_formats("jpeg", dpi=dpi, pil_kwargs={"quality": quality})


# --------------------------------------------------------------------------- folders


def _checkout_root() -> Path | None:
    """The repository root when the package runs from a checkout (it has ``pyproject.toml``)."""
    root = Path(__file__).resolve().parents[2]  # dino_nb/notebook/explore.py
    return root if (root / "pyproject.toml").is_file() else None


def relative(path: str | os.PathLike) -> Path:
    """``path`` relative to the working directory when possible, so printed paths hold no machine prefix."""
    path = Path(path)
    try:
        return Path(os.path.relpath(path.resolve(), Path.cwd()))
    except ValueError:  # another drive on Windows
        return path


def runs_dir(name: str) -> Path:
    """``runs/<name>`` of the checkout (or of the working directory), as a relative path.

    Notebooks run in ``notebooks/``, so this is usually ``../runs/<name>``; it is
    git-ignored. ``$DINO_NB_RUNS`` names another folder to hold the runs (e.g. a temporary
    one, so that a test executing copies of the notebooks never shares a run folder with
    ``pytest --nbval``).
    """
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"a run name must be a plain folder name, got {name!r}")
    env = os.environ.get(RUNS_ENV)
    if env:
        return relative(Path(env).expanduser() / name)
    root = _checkout_root() or Path.cwd()
    return relative(root / "runs" / name)


def training_config(profile: Profile, out: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """The notebooks' training configuration for a profile.

    * ``ci``: the whole ``cpu`` recipe (372 steps, a few minutes on a 2-core CPU) with a
      fixed step count instead of the preset's time budget, evaluated every
      :data:`CI_EVAL_EVERY` steps: long enough to learn, and its printed numbers repeat exactly.
    * ``cpu`` and ``gpu``: the rule of ``--preset auto`` with the notebooks' variants
      (:func:`dino_nb.tools.cli.auto_preset`). On a CPU with ImageNette found, ``cpu-photos-cls``
      (the photo recipe's 15 minutes with the ``[CLS]`` token as the embedding, so that
      attention maps mean something); on a GPU with ImageNette, the ``imagenette`` preset
      (ViT-S/16, the paper's crops), or ``t4`` (ViT-Ti/16) on a card of at most 16.5 GiB (a
      Colab or Kaggle T4, a P100), in a time budget of :data:`GPU_MINUTES` minutes; without
      ImageNette, the ``cpu`` preset (built-in data, a small ViT), on the GPU in ``gpu``.

    Args:
        profile: from :func:`pick_profile`.
        out: the run folder.
        **overrides: any :class:`~dino_nb.config.TrainConfig` field, applied last.
    """
    values: dict[str, Any] = {}
    name = training_preset(profile)
    if profile.name == "ci":
        # a fixed step count, not the preset's time budget: the outputs must repeat on any CPU
        values = {"eval_every": CI_EVAL_EVERY, "minutes": None}
    elif profile.name == "gpu":  # photos: a stated time, not the epochs; else cpu on the GPU
        values = {"device": "cuda"} if name == "cpu" else {"minutes": GPU_MINUTES}
    return preset(name, **{**values, "out": str(out), **overrides})


def training_preset(profile: Profile) -> str:
    """The preset :func:`training_config` starts from (``describe_preset`` says what it changes).

    ``cpu`` in the ``ci`` profile; elsewhere the rule of ``--preset auto`` with the
    notebooks' variants (:func:`dino_nb.tools.cli.auto_preset`), ImageNette counting as photos when
    it is found.
    """
    from ..sources import imagenette_available

    if profile.name == "ci":
        return "cpu"
    data = "imagenette" if imagenette_available() else "builtin"
    return auto_preset(data, profile.device, notebook=True)


def training_plan(cfg: TrainConfig, steps_per_epoch: int | None = None) -> str:
    """One line that says, before a notebook trains, how long the run will take and how to go on.

    On a GPU a second line estimates the memory the run needs. With a time budget (``cfg.minutes``, the ``gpu`` profile's :data:`GPU_MINUTES`), the
    minutes; without, the epochs and steps. Either way, running the cell again resumes.

    Args:
        cfg: the run's configuration.
        steps_per_epoch: ``TrainingData.steps_per_epoch``, to count the steps of a run
            without a budget (``None``: epochs only).
    """
    device = pick_device(cfg.device)
    where = f"{cfg.model} on {device.type}"
    if cfg.minutes:
        length = (
            f"at most {cfg.minutes:g} minutes (a time budget: the schedules are laid over the "
            "steps that fit)"
        )
    else:
        steps = f" of {steps_per_epoch} steps" if steps_per_epoch else ""
        length = f"{cfg.epochs} epochs{steps}, no time budget"
    memory = f"\n{memory_line(cfg)}" if device.type == "cuda" else ""  # a GPU's memory is finite
    return (
        f"training {where} for {length}; interrupted, it resumes from {relative(cfg.out)} "
        f"when the cell runs again{memory}"
    )


def finished_run(checkpoint: str | os.PathLike, cfg: TrainConfig) -> bool:
    """Whether ``checkpoint`` ends a run that had ``cfg``'s settings, so its result can be reused.

    Training is deterministic (same settings, same weights, also across a resume), so a finished
    run with the same settings, wherever it lives, is the run ``cfg`` would make: notebook 05
    reuses notebook 04's instead of training again. Fields in :data:`WHERE_FIELDS` are ignored.

    Args:
        checkpoint: a ``checkpoint.pth``; a missing file gives ``False``.
        cfg: the settings the caller would train with.
    """
    from ..checkpoint import load

    path = Path(checkpoint)
    if not path.is_file():
        return False
    state = load(path)
    theirs = TrainConfig.from_dict(state["config"]).to_dict()
    mine = cfg.to_dict()
    # a field left to "auto" (gpu_augment) is saved as the run decided it: any decision matches
    if any(theirs[k] != mine[k] for k in mine if k not in WHERE_FIELDS and mine[k] != "auto"):
        return False
    return "total_steps" in state and int(state["step"]) >= int(state["total_steps"])


# --------------------------------------------------------------------------- images


def sample_photos(max_side: int | None = 320) -> list[tuple[str, Image.Image]]:
    """The two photographs scikit-learn ships (no download): ``[("china", ...), ("flower", ...)]``.

    Args:
        max_side: shrink so the longer side has at most this many pixels (320, ImageNette's
            size, keeps notebooks small); ``None`` keeps the original 640 x 427.
    """
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    photos = []
    for f, a in zip(bunch.filenames, bunch.images, strict=True):
        img = Image.fromarray(a)
        if max_side is not None and max(img.size) > max_side:
            scale = max_side / max(img.size)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
        photos.append((Path(f).stem, img))
    return photos


def sample_images(
    profile: Profile, per_class: int = 1, photos: bool = True
) -> list[tuple[str, Image.Image]]:
    """Images for the augmentation explorer: ``[(title, RGB image), ...]``.

    ImageNette's validation images when ImageNette is found and the profile is not ``ci``
    (the committed outputs must not depend on what a machine has downloaded); otherwise the
    built-in dataset's. scikit-learn's two photographs come first with ``photos``.

    Args:
        profile: from :func:`pick_profile`.
        per_class: images per class.
        photos: include scikit-learn's sample photographs.
    """
    from ..datasets import rgb_loader
    from ..sources import class_names, ensure_builtin_dataset, find_imagenette

    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    root = None
    if not profile.is_ci:
        try:
            root = find_imagenette()
        except FileNotFoundError:
            root = None
    if root is None:
        root = ensure_builtin_dataset()
    out = sample_photos() if photos else []
    val = root / "val"
    classes = sorted(p.name for p in val.iterdir() if p.is_dir() and not p.name.startswith("."))
    for cls, nice in zip(classes, class_names(classes), strict=True):
        files = sorted(f for f in (val / cls).iterdir() if f.is_file())[:per_class]
        out.extend(
            (nice if per_class == 1 else f"{nice} {i}", rgb_loader(str(f)))
            for i, f in enumerate(files)
        )
    return out


# --------------------------------------------------------------------------- notebook 03: temperature


def tempered_softmax(
    logits: torch.Tensor, temperature: float, center: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """``softmax((logits - center) / temperature)`` over the last dimension.

    Raises:
        ValueError: for a temperature that is not positive.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return torch.softmax((logits.float() - center) / temperature, dim=-1)


def temperature_figure(logits: torch.Tensor, temperature: float, reference: float = 0.1) -> Figure:
    """Bars of ``softmax(logits / tau)`` at a reference temperature and at ``temperature``.

    Titles give each distribution's entropy (in nats) against ``log K``; a lower
    temperature sharpens (lower entropy), a higher one flattens.

    Args:
        logits: ``(K,)`` one sample's logits.
        temperature: the slider's temperature.
        reference: the temperature to compare with (the student's 0.1 in DINO).
    """
    if logits.ndim != 1:
        raise ValueError(f"logits must be (K,), got shape {tuple(logits.shape)}")
    k = logits.shape[0]
    fig = new_figure((11, 3.2))
    axes = fig.subplots(1, 3)
    axes[0].bar(range(k), logits.float().numpy(), color="tab:gray")
    axes[0].set_title("logits $g$")
    for ax, tau, color in ((axes[1], reference, "tab:blue"), (axes[2], temperature, "tab:orange")):
        p = tempered_softmax(logits, tau)
        h = float(-(p * p.clamp_min(1e-12).log()).sum())
        ax.bar(range(k), p.numpy(), color=color)
        ax.set_ylim(0, 1)
        ax.set_title(
            f"softmax($g/\\tau$), $\\tau$={tau:g}: entropy {h:.2f} / {math.log(k):.2f}", fontsize=9
        )
    for ax in axes:
        ax.set_xlabel("dimension")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- notebook 05: attention


def attention_explorer(
    images: torch.Tensor,
    maps: torch.Tensor,
    index: int = 0,
    head: int = -1,
    threshold: float = 0.6,
    names: Sequence[str] | None = None,
    mode: Literal["nearest", "bilinear"] = "nearest",
) -> Figure:
    """One image's CLS attention for one head (or the mean of all heads), and its mask.

    Panels: the image; the map overlaid; the image with everything outside the patches
    that hold ``threshold`` of the attention mass dimmed (the paper keeps 60%). The
    function behind notebook 05's sliders (image, head, threshold).

    Args:
        images: ``(n_images, 3, H, W)`` in [0, 1] (denormalised).
        maps: ``(n_images, n_heads, grid_h, grid_w)`` from
            :func:`~dino_nb.notebook.attention.cls_attention_maps`.
        index: which image.
        head: head index, or ``-1`` for the mean over heads.
        threshold: fraction of the attention mass the mask keeps, in (0, 1].
        names: a title per image (e.g. its class).
        mode: upsampling of the map to the image size.
    """
    if maps.ndim != 4 or images.ndim != 4 or maps.shape[0] != images.shape[0]:
        raise ValueError(
            f"need images (n, 3, H, W) and maps (n, n_heads, grid_h, grid_w) for the same n, "
            f"got {tuple(images.shape)} and {tuple(maps.shape)}"
        )
    n_images, n_heads = maps.shape[:2]
    if not 0 <= index < n_images:
        raise ValueError(f"index must be in [0, {n_images}), got {index}")
    if not -1 <= head < n_heads:
        raise ValueError(f"head must be -1 (mean) or in [0, {n_heads}), got {head}")
    one = (
        maps[index].float().mean(dim=0) if head == -1 else maps[index, head].float()
    )  # (grid_h, grid_w)
    keep = threshold_mask(one, threshold)  # (grid_h, grid_w)
    img = to_hwc(images[index])  # (H, W, 3)
    size = img.shape[:2]
    heat = upsample(one, size, mode).numpy()  # (H, W)
    mask = upsample(keep, size, "nearest").numpy()  # (H, W)
    fig = new_figure((9, 3.4))
    axes = fig.subplots(1, 3)
    axes[0].imshow(img)
    axes[0].set_title(names[index] if names is not None else f"image {index}", fontsize=9)
    axes[1].imshow(img)
    axes[1].imshow(heat, cmap="inferno", alpha=0.6)
    axes[1].set_title("mean of heads" if head == -1 else f"head {head}", fontsize=9)
    axes[2].imshow(img * (0.2 + 0.8 * mask[..., None]))
    axes[2].set_title(
        f"{threshold:.0%} of the mass: {int(keep.sum())} of {keep.numel()} patches", fontsize=9
    )
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig
