"""Pictures for the notebooks and the evaluation CLI (matplotlib).

Every plotting function builds and returns a ``matplotlib.figure.Figure`` and never calls
``plt.show``: a notebook shows the returned figure once (it is closed in pyplot, so the
inline backend does not show it a second time), a script saves it with ``fig.savefig``.
Images may be given as ``(3, H, W)`` tensors in [0, 1], ``(H, W, 3)`` arrays, or PIL images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from .attention import threshold_mask, upsample

ImageLike = torch.Tensor | np.ndarray | Image.Image


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A new figure, closed in pyplot so only the returned object displays it.

    Every figure of the package starts here (``viz``, ``explore``, ``collapse``): a notebook
    shows the returned figure once, and the inline backend does not show it a second time.
    """
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=figsize)
    plt.close(fig)
    return fig


def to_hwc(image: ImageLike) -> np.ndarray:
    """Turn an image into an ``(H, W, 3)`` float array in [0, 1] for ``imshow``.

    Args:
        image: ``(3, H, W)`` tensor in [0, 1] (use :func:`~dino_nb.augment.denormalize` on
            normalised tensors first), ``(H, W, 3)`` / ``(H, W)`` array (uint8 or float), or
            a PIL image.
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)  # (H, W, C)
        array = t.numpy()
    else:
        array = np.asarray(image)
        array = (
            array.astype(np.float32) / 255.0
            if array.dtype == np.uint8
            else array.astype(np.float32)
        )
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3):
        raise ValueError(f"expected an RGB image, got an array of shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.clip(array, 0.0, 1.0)


def class_colors(n_classes: int) -> np.ndarray:
    """``(n_classes, 4)`` RGBA colours: tab10/tab20 when they suffice, else evenly spaced hues."""
    from matplotlib import colormaps

    if n_classes <= 10:
        return colormaps["tab10"](np.arange(n_classes))
    if n_classes <= 20:
        return colormaps["tab20"](np.arange(n_classes))
    return colormaps["hsv"](np.linspace(0, 1, n_classes, endpoint=False))


def project_2d(
    embeddings: torch.Tensor | np.ndarray,
    method: Literal["pca", "tsne"] = "pca",
    seed: int = 0,
    perplexity: float = 30.0,
) -> np.ndarray:
    """Project embeddings to 2-D with scikit-learn's PCA or t-SNE.

    t-SNE needs ``perplexity < n_samples``; the perplexity is lowered to at most
    ``(n_samples - 1) / 3`` for small sets. Above 50 dimensions, PCA to 50 comes first
    (the usual speed-up; t-SNE on 384-d ViT-S features is slow otherwise). t-SNE costs
    about a minute for a few thousand points on a CPU: subsample large sets.

    Args:
        embeddings: ``(n_samples, dim)`` with ``n_samples >= 2``.
        method: ``"pca"`` or ``"tsne"``.
        seed: random state of t-SNE.
        perplexity: t-SNE perplexity (sklearn's default 30).

    Returns:
        ``(n_samples, 2)`` coordinates.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = (
        embeddings.detach().float().cpu().numpy()
        if isinstance(embeddings, torch.Tensor)
        else np.asarray(embeddings, dtype=np.float32)
    )
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (n_samples >= 2, dim) embeddings, got shape {x.shape}")
    if method == "pca":
        if x.shape[1] < 2:
            return np.concatenate([x, np.zeros_like(x)], axis=1)
        return PCA(n_components=2).fit_transform(x)
    if method == "tsne":
        n = x.shape[0]
        if x.shape[1] > 50 and n > 50:
            x = PCA(n_components=50, random_state=seed).fit_transform(x)
        perplexity = float(min(perplexity, max(1.0, (n - 1) / 3)))
        # exact gradients are cheaper than Barnes-Hut's set-up on small sets
        tsne_method = "exact" if n <= 300 else "barnes_hut"
        tsne = TSNE(
            n_components=2, perplexity=perplexity, init="pca", random_state=seed, method=tsne_method
        )
        return tsne.fit_transform(x)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def _class_name(label: int, class_names: Sequence[str] | None) -> str:
    return (
        class_names[label]
        if class_names is not None and 0 <= label < len(class_names)
        else str(label)
    )


def draw_embedding(
    ax,
    xy: np.ndarray,
    y: np.ndarray,
    colors: np.ndarray,
    class_names: Sequence[str] | None = None,
    images: Sequence[ImageLike] | Mapping[int, ImageLike] | None = None,
    n_thumbnails: int = 60,
    thumbnail_px: float = 24.0,
) -> None:
    """Draw 2-D points coloured by class on ``ax``, with thumbnails framed in their class colour.

    Args:
        ax: a matplotlib axis.
        xy: ``(n_samples, 2)`` coordinates.
        y: ``(n_samples,)`` classes.
        colors: ``(n_classes, 4)`` from :func:`class_colors`.
        class_names: names for the legend.
        images: one per sample (``n_thumbnails`` evenly spaced ones are drawn) or
            ``{sample index: image}``.
        n_thumbnails: at most this many thumbnails from a sequence.
        thumbnail_px: thumbnail height in points.
    """
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    for c in np.unique(y):
        sel = y == c
        ax.scatter(
            xy[sel, 0],
            xy[sel, 1],
            s=12,
            color=colors[c],
            label=_class_name(int(c), class_names),
            alpha=0.8,
        )
    chosen: list = []
    if isinstance(images, Mapping):
        chosen = [(int(i), img) for i, img in images.items()]
    elif images is not None:
        if len(images) != len(xy):
            raise ValueError(
                f"{len(images)} images for {len(xy)} embeddings; pass one per sample or a dict"
            )
        idx = np.unique(
            np.linspace(0, len(images) - 1, min(n_thumbnails, len(images))).round().astype(int)
        )
        chosen = [(int(i), images[int(i)]) for i in idx]
    for i, img in chosen:
        arr = to_hwc(img)
        box = OffsetImage(arr, zoom=thumbnail_px / arr.shape[0])
        ab = AnnotationBbox(
            box,
            tuple(xy[i]),
            frameon=True,
            pad=0.1,
            bboxprops={"edgecolor": colors[y[i]], "linewidth": 1.5},
        )
        ax.add_artist(ab)
    ax.set_xticks([])
    ax.set_yticks([])


def embedding_map(
    embeddings: torch.Tensor | np.ndarray,
    labels: torch.Tensor | Sequence[int],
    class_names: Sequence[str] | None = None,
    images: Sequence[ImageLike] | Mapping[int, ImageLike] | None = None,
    method: Literal["pca", "tsne"] = "pca",
    n_thumbnails: int = 60,
    thumbnail_px: float = 24.0,
    seed: int = 0,
    perplexity: float = 30.0,
) -> Figure:
    """2-D map of the embeddings, coloured by class, with image thumbnails on some points.

    Args:
        embeddings: ``(n_samples, dim)``.
        labels: ``(n_samples,)`` integer classes.
        class_names: names for the legend.
        images: thumbnails, either one per sample (a sequence of length ``n_samples``, of
            which ``n_thumbnails`` evenly spaced ones are drawn) or a mapping
            ``{sample index: image}``.
        method: ``"pca"`` or ``"tsne"`` (see :func:`project_2d`).
        n_thumbnails: at most this many thumbnails from a sequence.
        thumbnail_px: thumbnail height in points.
        seed: t-SNE random state.
        perplexity: t-SNE perplexity (capped for small sets).

    Returns:
        a figure with one axis.
    """
    y = np.asarray(torch.as_tensor(labels).cpu()).astype(int)
    xy = project_2d(embeddings, method, seed, perplexity)  # (n_samples, 2)
    if len(y) != len(xy):
        raise ValueError(f"{len(xy)} embeddings but {len(y)} labels")
    n_classes = int(max(y.max() + 1, len(class_names) if class_names is not None else 0))
    fig = new_figure((8, 7))
    ax = fig.subplots()
    draw_embedding(
        ax, xy, y, class_colors(n_classes), class_names, images, n_thumbnails, thumbnail_px
    )
    ax.set_title(f"embeddings ({method.upper() if method == 'pca' else 't-SNE'}), {len(y)} samples")
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, markerscale=1.5)
    fig.tight_layout()
    return fig


def neighbours_grid(
    query_images: Sequence[ImageLike],
    query_labels: torch.Tensor | Sequence[int],
    gallery_images: Sequence[ImageLike],
    gallery_labels: torch.Tensor | Sequence[int],
    similarities: torch.Tensor,
    indices: torch.Tensor,
    class_names: Sequence[str] | None = None,
) -> Figure:
    """Nearest-neighbour retrieval: each row is a query and its ``k`` nearest training images.

    Titles give the class and the cosine similarity; a neighbour's title is green when its
    class matches the query's, red otherwise.

    Args:
        query_images: ``n_query`` images.
        query_labels: ``(n_query,)``.
        gallery_images: indexable by the neighbour indices (e.g. all training images, or a
            lazy wrapper that loads them).
        gallery_labels: ``(n_gallery,)``.
        similarities: ``(n_query, k)`` from :func:`~dino_nb.evaluation.nearest_neighbours`.
        indices: ``(n_query, k)`` indices into the gallery.
        class_names: names of the classes.

    Returns:
        a figure with ``n_query * (k + 1)`` axes.
    """
    n_query, k = indices.shape
    if len(query_images) != n_query or similarities.shape != indices.shape:
        raise ValueError(
            f"{len(query_images)} query images, similarities {tuple(similarities.shape)}, "
            f"indices {tuple(indices.shape)}: they must agree"
        )
    qy = [int(v) for v in torch.as_tensor(query_labels)]
    gy = torch.as_tensor(gallery_labels)
    fig = new_figure((1.6 * (k + 1), 1.8 * n_query + 0.3))
    axes = np.atleast_2d(fig.subplots(n_query, k + 1, squeeze=False))
    for r in range(n_query):
        ax = axes[r, 0]
        ax.imshow(to_hwc(query_images[r]))
        ax.set_title(f"query\n{_class_name(qy[r], class_names)}", fontsize=8, fontweight="bold")
        for c in range(k):
            j = int(indices[r, c])
            label = int(gy[j])
            ax = axes[r, c + 1]
            ax.imshow(to_hwc(gallery_images[j]))
            ax.set_title(
                f"{_class_name(label, class_names)}\n{float(similarities[r, c]):.2f}",
                fontsize=8,
                color="tab:green" if label == qy[r] else "tab:red",
            )
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig


def confusion_matrix_figure(
    y_true: torch.Tensor | Sequence[int],
    y_pred: torch.Tensor | Sequence[int],
    class_names: Sequence[str] | None = None,
    normalize: bool = True,
) -> Figure:
    """Confusion matrix (rows: true class, columns: predicted), with a colour bar.

    Args:
        y_true: ``(n_samples,)`` true classes.
        y_pred: ``(n_samples,)`` predicted classes.
        class_names: names for the ticks; their number sets the matrix size.
        normalize: show each row as fractions of that class's samples.

    Returns:
        a figure with two axes (the matrix and its colour bar).
    """
    from sklearn.metrics import confusion_matrix

    t = np.asarray(torch.as_tensor(y_true).cpu()).astype(int)
    p = np.asarray(torch.as_tensor(y_pred).cpu()).astype(int)
    n = len(class_names) if class_names is not None else int(max(t.max(), p.max()) + 1)
    cm = confusion_matrix(t, p, labels=list(range(n))).astype(float)  # (n, n)
    if normalize:
        cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    names = [_class_name(i, class_names) for i in range(n)]
    side = max(4.0, 0.5 * n + 2)
    fig = new_figure((side + 1, side))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        threshold = cm.max() / 2 if cm.max() > 0 else 1
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    text = f"{cm[i, j]:.2f}" if normalize else f"{int(cm[i, j])}"
                    ax.text(
                        j,
                        i,
                        text,
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if cm[i, j] > threshold else "black",
                    )
    ax.set_title(
        f"confusion matrix ({'row-normalised' if normalize else 'counts'}), accuracy {np.mean(t == p):.1%}"
    )
    fig.tight_layout()
    return fig


def attention_grid(
    image: ImageLike,
    maps: torch.Tensor,
    threshold: float | None = 0.6,
    mode: Literal["nearest", "bilinear"] = "nearest",
    title: str | None = None,
    alpha: float = 0.6,
) -> Figure:
    """Self-attention of the CLS token, one column per head, over the image.

    Top row: the image, then each head's map overlaid on it. Bottom row (when
    ``threshold`` is given): the mean map over heads, then each head's thresholded mask
    (the patches holding ``threshold`` of the mass, :func:`~dino_nb.notebook.attention.threshold_mask`),
    with the rest of the image dimmed.

    Args:
        image: the input image in [0, 1] (denormalise first), ``(3, H, W)`` or PIL.
        maps: ``(n_heads, grid_h, grid_w)`` from :func:`~dino_nb.notebook.attention.cls_attention_maps`.
        threshold: fraction of attention mass the masks keep; ``None`` drops the bottom row.
        mode: upsampling of the maps to the image size.
        title: figure title (e.g. the class).
        alpha: opacity of the attention overlay.

    Returns:
        a figure with ``2 * (n_heads + 1)`` axes (``n_heads + 1`` without masks).
    """
    if maps.ndim != 3:
        raise ValueError(f"maps must be (n_heads, grid_h, grid_w), got shape {tuple(maps.shape)}")
    img = to_hwc(image)  # (H, W, 3)
    size = img.shape[:2]
    n_heads = maps.shape[0]
    up = upsample(maps, size, mode).numpy()  # (n_heads, H, W)
    rows = 2 if threshold is not None else 1
    fig = new_figure((1.9 * (n_heads + 1), 2.0 * rows + 0.4))
    axes = fig.subplots(rows, n_heads + 1, squeeze=False)
    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image", fontsize=9)
    for h in range(n_heads):
        ax = axes[0, h + 1]
        ax.imshow(img)
        ax.imshow(up[h], cmap="inferno", alpha=alpha)
        ax.set_title(f"head {h}", fontsize=9)
    if threshold is not None:
        ax = axes[1, 0]
        ax.imshow(img)
        ax.imshow(up.mean(axis=0), cmap="inferno", alpha=alpha)
        ax.set_title("mean of heads", fontsize=9)
        masks = upsample(
            threshold_mask(maps, threshold), size, "nearest"
        ).numpy()  # (n_heads, H, W)
        for h in range(n_heads):
            dimmed = img * (0.25 + 0.75 * masks[h][..., None])
            axes[1, h + 1].imshow(dimmed)
            axes[1, h + 1].set_title(f"head {h}: {threshold:.0%} mass", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
