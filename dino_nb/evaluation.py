"""What the features are worth: embeddings, kNN both ways, a linear probe.

DINO (Caron et al. 2021, Sec. 4.1) judges frozen features two ways: a weighted
k-nearest-neighbour classifier (Wu et al. 2018) with k in {10, 20, 100, 200}, and a
linear classifier trained on top. The tutorial used sklearn's plain kNN; both are here,
computed on the same features so their numbers can be compared
(``python -m dino_nb.evaluate`` prints both for a checkpoint).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

from .augment import IMAGENET_MEAN, IMAGENET_STD, JITTER, P_FLIP, P_GRAYSCALE, P_JITTER, denormalize
from .distributed import resolve_precision
from .loader import make_loader
from .model import unwrap_backbone

#: The paper's k sweep for the weighted kNN (Caron et al. 2021, App. B / Wu et al. 2018).
PAPER_KS = (10, 20, 100, 200)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """Mixed-precision dtype for inference: bf16 on GPUs that have it, else fp16; none on CPU."""
    return resolve_precision("auto", torch.device(device))


@contextlib.contextmanager
def inference(model: nn.Module, autocast: bool = True) -> Iterator[torch.device]:
    """Run ``model`` for inference: eval mode, ``torch.inference_mode`` and autocast, then its mode back.

    Autocast uses :func:`autocast_dtype` (bf16 or fp16 on a GPU, nothing on the CPU).

    Args:
        model: the module to run; its train/eval mode is restored on exit, even after an error.
        autocast: use mixed precision on a GPU.

    Yields:
        the device of the model's parameters (move the inputs there).

    Examples:
        >>> with inference(backbone) as device:  # doctest: +SKIP
        ...     features = backbone(images.to(device))
    """
    was_training = model.training
    device = next(model.parameters()).device
    dtype = autocast_dtype(device) if autocast else None
    model.eval()
    try:
        with (
            torch.inference_mode(),
            torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
        ):
            yield device
    finally:
        model.train(was_training)


def extract_features(
    backbone: nn.Module,
    data_loader: DataLoader,
    *,
    autocast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backbone over a loader of ``(images, labels)`` batches.

    Runs under ``torch.inference_mode`` in eval mode (the previous mode is restored), with
    autocast on a GPU (bf16 where supported, else fp16; none on CPU). Pass the teacher's or
    the student's backbone (``teacher.backbone``): the paper evaluates the teacher.

    Args:
        backbone: maps ``(n, 3, H, W)`` images to ``(n, dim)`` embeddings (a
            ``MultiCropWrapper`` is unwrapped to its backbone).
        data_loader: plain (unaugmented) images with integer labels, not shuffled.
        autocast: use mixed precision on a GPU.

    Returns:
        ``(features (n_samples, dim) float32 on CPU, labels (n_samples,) int64)``.
    """
    backbone = unwrap_backbone(backbone)
    feats, labels = [], []
    with inference(backbone, autocast) as device:
        for imgs, y in data_loader:
            feats.append(backbone(imgs.to(device, non_blocking=True)).float().cpu())  # (batch, dim)
            labels.append(torch.as_tensor(y))
    features, targets = torch.cat(feats), torch.cat(labels).long()  # (n_samples, dim), (n_samples,)

    return features, targets


def compute_knn(
    backbone: nn.Module, data_loader_train: DataLoader, data_loader_val: DataLoader
) -> float:
    """The tutorial's kNN: sklearn's ``KNeighborsClassifier`` (k=5, Euclidean) on CLS embeddings.

    Args:
        backbone: maps ``(n, 3, H, W)`` images to ``(n, dim)`` embeddings.
        data_loader_train: plain (unaugmented) training images with labels.
        data_loader_val: plain validation images with labels.

    Returns:
        validation accuracy in [0, 1].
    """
    x_train, y_train = extract_features(backbone, data_loader_train)
    x_val, y_val = extract_features(backbone, data_loader_val)
    return sklearn_knn_topk(x_train, y_train, x_val, y_val)[0]


def compute_embedding(
    backbone: nn.Module, data_loader: DataLoader
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Embeddings, images and class names of a (small) loader, for TensorBoard's projector.

    Returns:
        ``embs (n_samples, dim)`` float32 on CPU, ``imgs (n_samples, 3, H, W)`` in [0, 1]
        (denormalised correctly, unlike the tutorial), and the class name of each sample.
    """
    backbone = unwrap_backbone(backbone)
    classes = data_loader.dataset.classes  # type: ignore[attr-defined]
    embs, imgs, labels = [], [], []
    with inference(backbone) as device:
        for img, y in data_loader:
            embs.append(backbone(img.to(device)).float().cpu())  # (batch, dim)
            imgs.append(denormalize(img.cpu()))  # (batch, 3, H, W) in [0, 1]
            labels.extend(classes[i] for i in torch.as_tensor(y).tolist())
    return torch.cat(embs), torch.cat(imgs), labels


def _check_pair(features: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if features.ndim != 2:
        raise ValueError(
            f"{name} features must be (n_samples, dim), got shape {tuple(features.shape)}"
        )
    if features.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}: {features.shape[0]} feature rows but {labels.shape[0]} labels; they must match"
        )
    if features.shape[0] == 0:
        raise ValueError(f"{name} set is empty")


@torch.no_grad()
def nearest_neighbours(
    train_features: torch.Tensor, query_features: torch.Tensor, k: int = 5, chunk_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar training samples of each query.

    Args:
        train_features: ``(n_train, dim)``.
        query_features: ``(n_query, dim)``.
        k: neighbours per query (capped at ``n_train``).
        chunk_size: queries per similarity matrix, to bound memory.

    Returns:
        ``(similarities (n_query, k), indices (n_query, k))``, most similar first.
    """
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)  # (n_train, dim)
    query = F.normalize(query_features.float(), dim=1)  # (n_query, dim)
    sims, idx = [], []
    for start in range(0, query.shape[0], chunk_size):
        s, i = (query[start : start + chunk_size] @ train.T).topk(k, dim=1)  # (c, k)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


@torch.no_grad()
def weighted_knn_votes(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class votes of the paper's weighted kNN: ``sum over the k neighbours of exp(cos / T)``.

    Args:
        train_features: ``(n_train, dim)``.
        train_labels: ``(n_train,)`` integer classes.
        query_features: ``(n_query, dim)``.
        k: number of neighbours (capped at ``n_train``).
        temperature: softness of the votes (0.07 in the paper).
        num_classes: number of classes; default ``max(train_labels) + 1``.
        chunk_size: queries per similarity matrix, to bound memory.

    Returns:
        ``(n_query, num_classes)`` votes; the prediction is the argmax.
    """
    train_labels = train_labels.long()
    if num_classes is None:
        num_classes = int(train_labels.max()) + 1
    sims, idx = nearest_neighbours(train_features, query_features, k, chunk_size)  # (n_query, k)
    votes = torch.zeros(query_features.shape[0], num_classes)
    votes.scatter_add_(
        1, train_labels.cpu()[idx.cpu()], (sims.cpu() / temperature).exp()
    )  # (n_query, num_classes)
    return votes


@torch.no_grad()
def weighted_knn(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> tuple[float, float]:
    """The paper's weighted k-nearest-neighbour classifier (DINO, Sec. 4.1; Wu et al. 2018).

    Features are L2-normalised; each test sample takes its ``k`` most cosine-similar
    training samples, and each neighbour votes for its class with weight
    ``exp(similarity / temperature)`` (:func:`weighted_knn_votes`, whose arguments these are,
    with ``test_labels (n_test,)`` to score the votes against).

    Returns:
        ``(top1, top5)`` accuracies as fractions in [0, 1].
    """
    _check_pair(train_features, train_labels, "train")
    _check_pair(test_features, test_labels, "test")
    train_labels = train_labels.long()
    test_labels = test_labels.long().cpu()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    votes = weighted_knn_votes(
        train_features, train_labels, test_features, k, temperature, num_classes, chunk_size
    )  # (n_test, num_classes)
    ranked = votes.argsort(dim=1, descending=True, stable=True)
    top1 = (ranked[:, 0] == test_labels).float().mean().item()
    top5 = (
        (ranked[:, : min(5, num_classes)] == test_labels[:, None]).any(dim=1).float().mean().item()
    )
    return top1, top5


def sklearn_knn_topk(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    k: int = 5,
) -> tuple[float, float]:
    """The tutorial's sklearn kNN (Euclidean, uniform votes) with top-1 and top-5 accuracy.

    The classes are ranked by their share of the ``k`` neighbours (``predict_proba``, one
    neighbour search). Top-1 is the first of them, the smallest label among tied classes:
    what sklearn's ``predict`` returns for uniform votes (tested).

    Returns:
        ``(top1, top5)`` as fractions in [0, 1].
    """
    _check_pair(x_train, y_train, "train")
    _check_pair(x_val, y_val, "val")
    estimator = KNeighborsClassifier(n_neighbors=min(k, len(x_train)))
    estimator.fit(x_train.float().numpy(), y_train.numpy())
    xv, yv = x_val.float().numpy(), y_val.numpy()
    proba = estimator.predict_proba(xv)  # (n_val, n_train_classes), columns = estimator.classes_
    order = np.argsort(-proba, axis=1, kind="stable")[:, :5]
    top5_classes = estimator.classes_[order]  # (n_val, <=5), most voted first
    top1 = float((top5_classes[:, 0] == yv).mean())
    top5 = float((top5_classes == yv[:, None]).any(axis=1).mean())
    return top1, top5


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    C: float = 1.0,
    max_iter: int = 1000,
) -> float:
    """The paper's second metric, a linear classifier on frozen features (top-1).

    The paper trains a linear layer with SGD on augmented images; this is the cheap
    stand-in: multinomial logistic regression (sklearn, L-BFGS) on standardised features.

    Args:
        train_features: ``(n_train, dim)``.
        train_labels: ``(n_train,)``; needs at least two classes.
        val_features: ``(n_val, dim)``.
        val_labels: ``(n_val,)``.
        C: inverse L2 regularisation strength.
        max_iter: L-BFGS iterations.

    Returns:
        validation top-1 accuracy in [0, 1].
    """
    _check_pair(train_features, train_labels, "train")
    _check_pair(val_features, val_labels, "val")
    if len(torch.unique(train_labels)) < 2:
        raise ValueError("linear_probe needs training samples of at least two classes")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
    probe.fit(train_features.float().numpy(), train_labels.numpy())
    return float(accuracy_score(val_labels.numpy(), probe.predict(val_features.float().numpy())))


class KnnEvaluator:
    """Weighted kNN (and the tutorial's sklearn kNN) on a fixed subset of plain train, and val.

    Used during training (``cfg`` is the run's :class:`~dino_nb.config.TrainConfig`: its
    ``seed``, ``eval_train_subset``, ``batch_size_eval``, ``knn_k`` and ``knn_temperature``).

    The subsets are drawn once with their own generator, so evaluation costs the same every
    time, never touches the training random state, and its numbers are comparable across
    steps. ``score_key`` names the number that picks the best model.
    """

    score_key = "knn_top1"

    def __init__(
        self, bundle: Any, cfg: Any, num_workers: int = 0, pin_memory: bool = False
    ) -> None:
        g = torch.Generator().manual_seed(cfg.seed)
        n_train = len(bundle.train_plain)
        subset = (
            torch.randperm(n_train, generator=g)[: cfg.eval_train_subset].sort().values.tolist()
        )
        self.train_loader = make_loader(
            torch.utils.data.Subset(bundle.train_plain, subset),
            cfg.batch_size_eval,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator(),
        )
        self.val_loader = make_loader(
            bundle.val_plain,
            cfg.batch_size_eval,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator(),
        )
        self.k = cfg.knn_k
        self.temperature = cfg.knn_temperature
        self.num_classes = len(bundle.classes)

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """Scores of ``backbone``: weighted kNN top-1/top-5 and the sklearn kNN accuracy."""
        x_train, y_train = extract_features(backbone, self.train_loader)  # autocast on a GPU
        x_val, y_val = extract_features(backbone, self.val_loader)
        top1, top5 = weighted_knn(
            x_train, y_train, x_val, y_val, self.k, self.temperature, self.num_classes
        )
        sklearn_top1 = sklearn_knn_topk(x_train, y_train, x_val, y_val)[0]
        return {"knn_top1": top1, "knn_top5": top5, "knn_sklearn": sklearn_top1}


# --------------------------------------------------------------------------- without labels


def twin_retrieval(views_a: torch.Tensor, views_b: torch.Tensor) -> float:
    """How often an image's view finds its own twin view as its most cosine-similar one.

    Row ``i`` of both tensors comes from image ``i``. Each view of ``views_a`` searches all of
    ``views_b`` and each view of ``views_b`` all of ``views_a``; the score is the fraction
    of the ``2 n`` searches whose nearest neighbour is the twin. Chance is ``1 / n``.

    Args:
        views_a: ``(n_images, dim)`` features of the first view of each image.
        views_b: ``(n_images, dim)`` features of the second view.

    Returns:
        the fraction in [0, 1].
    """
    if views_a.shape != views_b.shape or views_a.ndim != 2 or views_a.shape[0] == 0:
        raise ValueError(
            f"need two (n_images, dim) tensors of one shape, got {tuple(views_a.shape)} "
            f"and {tuple(views_b.shape)}"
        )
    a = F.normalize(views_a.float(), dim=1)  # (n, dim)
    b = F.normalize(views_b.float(), dim=1)  # (n, dim)
    sims = a @ b.T  # (n, n): sims[i, j] = cos(view a of i, view b of j)
    twins = torch.arange(a.shape[0])
    hits = (sims.argmax(dim=1) == twins).sum() + (sims.argmax(dim=0) == twins).sum()
    return hits.item() / (2 * a.shape[0])


def view_transform(size: int) -> Callable[[Any], torch.Tensor]:
    """The random view of :func:`view_agreement`: a crop of 25-100 % of the image, flip, colour.

    DINO's global-crop family without blur and solarisation (jitter strengths of the paper),
    resized to ``size`` and normalised.
    """
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                size, scale=(0.25, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(p=P_FLIP),
            transforms.RandomApply([transforms.ColorJitter(*JITTER)], p=P_JITTER),
            transforms.RandomGrayscale(p=P_GRAYSCALE),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _flatten_views(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``B`` x ``(2, 3, s, s)`` twin views to ``(2 B, 3, s, s)``, twins adjacent, and dummy labels."""
    views = torch.cat([pair for pair, _ in batch])  # (2 B, 3, s, s)
    return views, torch.zeros(len(views), dtype=torch.long)


def view_agreement(
    backbone: nn.Module,
    dataset: Any,
    size: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, float]:
    """A label-free score of features: do two random views of an image find each other?

    Each image gets two random views (:func:`view_transform`); both are embedded, and
    :func:`twin_retrieval` counts how often a view's nearest neighbour among the other
    views is its own twin. Good features are invariant to the augmentations (the twins
    stay close) and distinctive (other images stay further away), so the score rises as
    they improve; a collapsed model (every image alike) scores chance, ``1 / n``. It
    measures instance retrieval, not semantics: the label-free stand-in for kNN accuracy.

    The views are drawn from their own seeded generator (the training random state is
    untouched), so every call on the same images sees the same views.

    Args:
        backbone: maps ``(n, 3, size, size)`` images to ``(n, dim)`` features.
        dataset: images with ``with_transform`` (an :class:`~dino_nb.datasets.ImageFiles` or
            ``RobustImageFolder``), e.g. the held-aside images of an unlabelled folder.
        size: side of the views in pixels.
        seed: seeds the views.
        batch_size: images per forward pass.

    Returns:
        ``{"view_agreement": fraction, "view_agreement_chance": 1 / n}``.
    """
    backbone = unwrap_backbone(backbone)
    view = view_transform(size)
    twins = dataset.with_transform(lambda img: torch.stack([view(img), view(img)]))
    with torch.random.fork_rng(devices=[]):  # views from their own seed, same at every call
        torch.manual_seed(seed)
        features, _ = extract_features(
            backbone, make_loader(twins, batch_size, collate_fn=_flatten_views)
        )
    n = len(dataset)
    pairs = features.view(n, 2, -1)  # (n_images, 2, dim): the two views of each image
    return {
        "view_agreement": twin_retrieval(pairs[:, 0], pairs[:, 1]),
        "view_agreement_chance": 1.0 / n,
    }


class ViewAgreementEvaluator:
    """:func:`view_agreement` on the held-aside images of an unlabelled folder, during training.

    The training loop's evaluation when there are no labels (``bundle.labelled`` is
    false); ``score_key`` names the number that picks the best model.
    """

    score_key = "view_agreement"

    def __init__(self, bundle: Any, cfg: Any) -> None:
        self.dataset = bundle.val_plain
        self.size, self.seed, self.batch_size = cfg.global_size, cfg.seed, cfg.batch_size_eval

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """The view agreement of ``backbone`` and its chance level."""
        return view_agreement(
            backbone, self.dataset, self.size, seed=self.seed, batch_size=self.batch_size
        )


def make_evaluator(
    bundle: Any, cfg: Any, num_workers: int = 0, pin_memory: bool = False
) -> KnnEvaluator | ViewAgreementEvaluator:
    """The training loop's evaluation: weighted kNN with labels, view agreement without."""
    if bundle.labelled:
        return KnnEvaluator(bundle, cfg, num_workers, pin_memory)
    return ViewAgreementEvaluator(bundle, cfg)
