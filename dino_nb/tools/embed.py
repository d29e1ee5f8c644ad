"""Your own images: embed a folder with a trained backbone, then search it by similarity.

A folder in (any nesting, no labels), embeddings out: ``embeddings.npy`` (float32, one row
per image, L2-normalised unless told otherwise) and ``index.csv`` (``row,path``, the path
relative to the folder), both written atomically. Every image goes through the evaluation
preprocessing (:func:`~dino_nb.datasets.plain_transform`: resize, centre crop, normalise).

Large folders are cached and resumable: the features of each file are kept in
``cache.pt`` beside the outputs, keyed by the file (relative path, size, modification
time) and by the weights (checkpoint path, size and modification time, or the timm name),
and the cache is saved every few hundred images. A re-run embeds only new or changed files;
a changed file is always re-embedded, never served stale.

Command line::

    python -m dino_nb.embed --checkpoint runs/<run>/best_model.pth --data ~/photos --out emb
    python -m dino_nb.embed --checkpoint runs/<run>/best_model.pth --data ~/photos --out emb
        --query ~/photos/cat.jpg --top 8 --sheet cat_neighbours.png  # (one line)
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import atomic_file, load, save_atomic
from ..datasets import (
    ImageFiles,
    drop_unreadable,
    plain_transform,
    rgb_loader,
)
from ..distributed import pick_device
from ..evaluation import extract_features, nearest_neighbours
from ..loader import make_loader
from .cli import option, run_program

#: Files of an embedding folder.
EMBEDDINGS, INDEX, CACHE, META = "embeddings.npy", "index.csv", "cache.pt", "embed.json"
#: The feature cache is saved after every this many newly embedded images.
FLUSH_EVERY = 512


@dataclass
class Model:
    """A backbone with what embedding needs to know about it.

    Attributes:
        backbone: maps ``(n, 3, size, size)`` images to ``(n, dim)`` features.
        image_size: side of the centre crop it sees (the run's ``global_size``, or timm's).
        identity: names the weights; the feature cache is valid only for the same identity.
        source: the checkpoint path or timm name it was loaded from.
    """

    backbone: nn.Module
    image_size: int
    identity: str
    source: str


def load_model(source: str | os.PathLike, which: str = "teacher") -> Model:
    """A backbone from a training checkpoint, or a timm model name with pretrained weights.

    Args:
        source: ``checkpoint.pth``/``best_model.pth`` of a run, or a timm name such as
            ``vit_small_patch16_224.augreg_in21k`` (downloads its weights: needs the network).
        which: ``"teacher"`` (the paper's choice) or ``"student"``, for checkpoints.

    Raises:
        FileNotFoundError: neither a file nor a timm name.
        ValueError: a file that is not a training checkpoint.
        RuntimeError: a damaged checkpoint, or pretrained weights that cannot be downloaded.
    """
    from ..model import backbone_from_checkpoint, build_backbone

    path = Path(source).expanduser()
    if path.is_file():
        state = load(path)
        if "config" not in state or which not in state:
            raise ValueError(
                f"{path} is not a dino_nb training checkpoint (needs 'config' and '{which}')"
            )
        config = state["config"]
        del state
        st = path.stat()
        identity = f"{path.resolve()}|{which}|{st.st_size}|{st.st_mtime_ns}"
        backbone = backbone_from_checkpoint(str(path), which)
        return Model(backbone, int(config.get("global_size") or 224), identity, str(path))
    import timm

    if not timm.is_model(str(source)):
        raise FileNotFoundError(
            f"{source} is neither a checkpoint file nor a timm model name "
            "(e.g. vit_small_patch16_224.augreg_in21k)"
        )
    try:
        backbone = build_backbone(str(source), pretrained=True)
    except Exception as err:  # noqa: BLE001 - hub, network and file errors of many kinds
        raise RuntimeError(
            f"could not load the pretrained weights of {source} ({type(err).__name__}); "
            "check the network, or pass a training checkpoint with --checkpoint"
        ) from None
    size = int(backbone.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    return Model(backbone.eval(), size, f"timm:{source}", str(source))


@dataclass
class Embeddings:
    """The embeddings of a folder: row ``i`` of ``features`` is the image ``paths[i]``.

    Attributes:
        root: the folder.
        paths: image files relative to ``root`` (POSIX separators), in row order.
        features: ``(n_images, dim)`` float32.
        normalized: whether the rows are L2-normalised.
    """

    root: Path
    paths: list[str]
    features: np.ndarray
    normalized: bool

    def row(self, image: str | os.PathLike) -> int | None:
        """The row of an image of the folder (absolute or relative path), or ``None``."""
        path = Path(image).expanduser()
        try:
            rel = path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            rel = path.as_posix()
        return self.paths.index(rel) if rel in self.paths else None


def _file_keys(dataset: ImageFiles) -> list[str]:
    """``relative path, size, mtime`` of every sample: a file whose key changed is re-embedded."""
    keys = []
    for rel, (path, _) in zip(dataset.relative_paths, dataset.samples, strict=True):
        st = os.stat(path)
        keys.append(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}")
    return keys


def _read_cache(path: Path, identity: str, size: int) -> dict[str, torch.Tensor]:
    """``{file key: features (dim,)}`` of a cache made by the same weights at the same size."""
    if not path.is_file():
        return {}
    try:
        cached = load(path)
    except RuntimeError:  # damaged leftover: embed again
        return {}
    if cached.get("identity") != identity or cached.get("image_size") != size:
        return {}
    return dict(zip(cached["keys"], cached["features"], strict=True))


def _write_cache(path: Path, identity: str, size: int, known: dict[str, torch.Tensor]) -> None:
    keys = list(known)
    features = torch.stack([known[k] for k in keys]) if keys else torch.zeros(0)
    save_atomic(
        {"identity": identity, "image_size": size, "keys": keys, "features": features}, path
    )


def _index_csv(paths: Sequence[str]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["row", "path"])
    writer.writerows(enumerate(paths))
    return text.getvalue().encode()


def embed_folder(
    model: Model | str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    normalize: bool = True,
    batch_size: int = 64,
    device: str = "auto",
    num_workers: int = 0,
    progress: bool = True,
) -> Embeddings:
    """Embed every image below ``data``; with ``out``, write and cache the results there.

    Unreadable files are skipped with one :class:`~dino_nb.datasets.DataWarning` (they get no
    row). With ``out``, features already in ``out/cache.pt`` for the same file and weights
    are reused, the cache is saved every :data:`FLUSH_EVERY` new images (an interrupted
    run resumes), and ``embeddings.npy``, ``index.csv`` and ``embed.json`` are written.

    Args:
        model: a :class:`Model`, or what :func:`load_model` accepts.
        data: the folder of images (any nesting).
        out: folder for the outputs and the cache; ``None`` keeps everything in memory.
        normalize: L2-normalise the rows (cosine similarity is then a dot product).
        batch_size: images per forward pass.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        num_workers: data loader workers.
        progress: show a progress bar.

    Returns:
        the :class:`Embeddings`, row ``i`` for ``paths[i]`` (sorted relative paths).

    Raises:
        FileNotFoundError: the folder is missing or holds no readable images.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    model = model if isinstance(model, Model) else load_model(model)
    root = Path(data).expanduser()
    files = ImageFiles(root, plain_transform(model.image_size))
    drop_unreadable(root, [files], strict=False)  # one warning that lists them; none left: error
    keys = _file_keys(files)
    out_dir = Path(out).expanduser() if out is not None else None
    cache_path = out_dir / CACHE if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    cached = _read_cache(cache_path, model.identity, model.image_size) if cache_path else {}
    known = {k: cached[k] for k in keys if k in cached}  # stale entries are dropped
    todo = [i for i, k in enumerate(keys) if k not in known]

    backbone = model.backbone.to(pick_device(device))
    done = len(keys) - len(todo)
    bar = tqdm(total=len(keys), initial=done, desc="embedding", unit="img", disable=not progress)
    for start in range(0, len(todo), max(batch_size, FLUSH_EVERY)):
        part = todo[start : start + max(batch_size, FLUSH_EVERY)]
        loader = make_loader(
            torch.utils.data.Subset(files, part), batch_size, num_workers=num_workers
        )
        features, _ = extract_features(backbone, loader)  # (len(part), dim)
        known.update({keys[i]: f for i, f in zip(part, features, strict=True)})
        bar.update(len(part))
        if cache_path is not None:
            _write_cache(cache_path, model.identity, model.image_size, known)
    bar.close()

    features = torch.stack([known[k] for k in keys]).float()  # (n_images, dim)
    if normalize:
        features = F.normalize(features, dim=1)
    result = Embeddings(root, files.relative_paths, features.numpy(), normalize)
    if out_dir is not None:
        if cache_path is not None and set(cached) != set(known):  # also drops stale entries
            _write_cache(cache_path, model.identity, model.image_size, known)
        _write_outputs(out_dir, result, model)
    return result


def _write_outputs(out_dir: Path, result: Embeddings, model: Model) -> None:
    """``embeddings.npy``, ``index.csv`` and ``embed.json``, each written atomically."""
    with atomic_file(out_dir / EMBEDDINGS) as tmp, open(tmp, "wb") as f:
        np.save(f, result.features)
    with atomic_file(out_dir / INDEX) as tmp:
        tmp.write_bytes(_index_csv(result.paths))
    meta = {
        "data": str(result.root.resolve()),
        "model": model.source,
        "image_size": model.image_size,
        "normalized": result.normalized,
        "rows": len(result.paths),
        "dim": int(result.features.shape[1]),
    }
    with atomic_file(out_dir / META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")


@dataclass
class Match:
    """One search result: an image of the folder and its cosine similarity to the query."""

    row: int
    path: str
    similarity: float


def embed_image(model: Model, image: str | os.PathLike) -> np.ndarray:
    """The ``(dim,)`` features of one image file, with the evaluation preprocessing."""
    tensor = plain_transform(model.image_size)(rgb_loader(str(image)))[None]  # (1, 3, s, s)
    loader = [(tensor, torch.zeros(1, dtype=torch.long))]
    features, _ = extract_features(model.backbone, loader)  # type: ignore[arg-type]
    return features[0].numpy()


def search(
    embeddings: Embeddings,
    query: str | os.PathLike | int,
    top: int = 8,
    model: Model | str | os.PathLike | None = None,
) -> list[Match]:
    """The ``top`` images of the folder most cosine-similar to ``query``, most similar first.

    An image of the folder (or its row number) is looked up in ``embeddings``; any other
    image file is embedded with ``model``, which must be the one that made the embeddings.
    An image of the folder finds itself first, at similarity 1.

    Args:
        embeddings: from :func:`embed_folder` or :func:`read_embeddings`.
        query: an image file, or a row of ``embeddings``.
        top: how many images to return (at most the folder's size).
        model: embeds a query from outside the folder.

    Examples:
        >>> emb = embed_folder("runs/photos/best_model.pth", "~/photos", "emb")  # doctest: +SKIP
        >>> for m in search(emb, "~/photos/cat.jpg", top=5):  # doctest: +SKIP
        ...     print(f"{m.similarity:.3f} {m.path}")
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    row = query if isinstance(query, int) else embeddings.row(query)
    if row is not None:
        vector = embeddings.features[row]
    else:
        if not Path(query).expanduser().is_file():
            raise FileNotFoundError(f"query image not found: {query}")
        if model is None:
            raise ValueError(f"{query} is not in {embeddings.root}; pass the model to embed it")
        model = model if isinstance(model, Model) else load_model(model)
        vector = embed_image(model, Path(query).expanduser())
    sims, idx = nearest_neighbours(
        torch.from_numpy(embeddings.features), torch.from_numpy(vector)[None], k=top
    )  # (1, top) each
    return [
        Match(int(i), embeddings.paths[int(i)], float(s))
        for s, i in zip(sims[0].tolist(), idx[0].tolist(), strict=True)
    ]


def read_embeddings(out: str | os.PathLike) -> Embeddings:
    """The :class:`Embeddings` that :func:`embed_folder` wrote to ``out``."""
    out = Path(out)
    meta = json.loads((out / META).read_text())
    with open(out / INDEX, newline="") as f:
        paths = [row["path"] for row in csv.DictReader(f)]
    features = np.load(out / EMBEDDINGS)
    return Embeddings(Path(meta["data"]), paths, features, bool(meta["normalized"]))


def contact_sheet(
    embeddings: Embeddings, query: str | os.PathLike, matches: Sequence[Match], thumb: int = 128
) -> Any:
    """A figure: the query, then each match with its similarity and file name."""
    from ..notebook.figures import new_figure

    def picture(path: str | os.PathLike) -> Any:
        img = rgb_loader(str(path))
        img.thumbnail((thumb, thumb))
        return img

    n = len(matches) + 1
    cols = min(n, 5)
    rows = -(-n // cols)
    fig = new_figure((2.2 * cols, 2.4 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    axes[0].imshow(picture(Path(query).expanduser()))
    axes[0].set_title(f"query\n{Path(query).name}", fontsize=8, fontweight="bold")
    for ax, m in zip(axes[1:], matches, strict=False):
        ax.imshow(picture(embeddings.root / m.path))
        ax.set_title(f"{m.similarity:.3f}\n{Path(m.path).name}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- command line


@dataclass(kw_only=True)
class EmbedOptions:
    """The options of ``python -m dino_nb.embed``."""

    checkpoint: str = option(
        help="checkpoint.pth or best_model.pth of a training run, or a timm model name "
        "with pretrained weights (downloads them)"
    )
    data: str = option(help="folder of images, in any nesting")
    out: str = option(help="folder for embeddings.npy, index.csv and the cache")
    which: Literal["teacher", "student"] = option("teacher", "backbone of a checkpoint")
    normalize: bool = option(True, "L2-normalise the rows (--no-normalize: store raw features)")
    batch_size: int = option(64, "images per forward pass", min=1)
    num_workers: int = option(0, "data loader workers", min=0)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto: CUDA when available")
    query: str | None = option(None, "an image: print its nearest images in the folder")
    top: int = option(8, "how many neighbours --query prints", min=1)
    sheet: str | None = option(None, "write the query and its neighbours to this PNG")
    progress: bool = option(True, "show a progress bar")


def _embed(opts: EmbedOptions) -> int:
    if opts.query is not None and not Path(opts.query).expanduser().is_file():
        raise FileNotFoundError(f"query image not found: {opts.query}")
    pick_device(opts.device)
    model = load_model(opts.checkpoint, opts.which)
    emb = embed_folder(
        model,
        opts.data,
        opts.out,
        normalize=opts.normalize,
        batch_size=opts.batch_size,
        device=opts.device,
        num_workers=opts.num_workers,
        progress=opts.progress,
    )
    matches = search(emb, opts.query, opts.top, model) if opts.query is not None else []
    out = Path(opts.out)
    print(f"{len(emb.paths)} images -> {out / EMBEDDINGS} {emb.features.shape} and {out / INDEX}")
    if opts.query is None:
        return 0
    print(f"nearest to {opts.query} (cosine similarity):")
    for m in matches:
        print(f"  {m.similarity:6.3f}  {m.path}")
    if opts.sheet:
        contact_sheet(emb, opts.query, matches).savefig(opts.sheet, dpi=100)
        print(f"contact sheet written to {opts.sheet}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m dino_nb.embed``; returns the exit code."""
    return run_program(
        _embed,
        EmbedOptions,
        argv,
        prog="python -m dino_nb.embed",
        description="Embed a folder of images (any nesting, no labels) and search it by "
        "similarity. Errors are one line and exit code 2.",
    )


if __name__ == "__main__":
    sys.exit(main())
