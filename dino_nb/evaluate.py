"""What the features are worth: embeddings, kNN classification (the tutorial's sklearn
classifier and the paper's weighted kNN)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score
from sklearn.neighbors import KNeighborsClassifier
from torch import nn
from torch.utils.data import DataLoader

from .augment import denormalize


@torch.inference_mode()
def extract_features(backbone: nn.Module, data_loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the backbone over a loader of ``(images, labels)`` batches.

    Returns:
        ``(features (n_samples, dim) float32 on CPU, labels (n_samples,) int64)``.
    """
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    feats, labels = [], []
    try:
        for imgs, y in data_loader:
            feats.append(backbone(imgs.to(device, non_blocking=True)).float().cpu())
            labels.append(torch.as_tensor(y))
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


def compute_knn(backbone: nn.Module, data_loader_train: DataLoader, data_loader_val: DataLoader) -> float:
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
    return sklearn_knn_accuracy(x_train, y_train, x_val, y_val)


@torch.inference_mode()
def compute_embedding(backbone: nn.Module, data_loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Embeddings, images and class names of a (small) loader, for TensorBoard's projector.

    Returns:
        ``embs (n_samples, dim)``, ``imgs (n_samples, 3, H, W)`` in [0, 1] (denormalised
        correctly, unlike the tutorial), and the class name of each sample.
    """
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    classes = data_loader.dataset.classes  # type: ignore[attr-defined]
    embs, imgs, labels = [], [], []
    try:
        for img, y in data_loader:
            embs.append(backbone(img.to(device)).float().cpu())
            imgs.append(denormalize(img.cpu()))
            labels.extend(classes[i] for i in torch.as_tensor(y).tolist())
    finally:
        backbone.train(was_training)
    return torch.cat(embs), torch.cat(imgs), labels


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
    ``exp(similarity / temperature)``.

    Args:
        train_features: ``(n_train, dim)``.
        train_labels: ``(n_train,)`` integer classes.
        test_features: ``(n_test, dim)``.
        test_labels: ``(n_test,)``.
        k: number of neighbours (capped at ``n_train``).
        temperature: softness of the votes (0.07 in the paper).
        num_classes: number of classes; default ``max(label) + 1``.
        chunk_size: test samples per similarity matrix, to bound memory.

    Returns:
        ``(top1, top5)`` accuracies as fractions in [0, 1].
    """
    if train_features.shape[0] != train_labels.shape[0] or test_features.shape[0] != test_labels.shape[0]:
        raise ValueError("features and labels must have the same number of samples")
    if train_features.shape[0] == 0 or test_features.shape[0] == 0:
        raise ValueError("weighted_knn needs at least one training and one test sample")
    train_labels = train_labels.long()
    test_labels = test_labels.long()
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)  # (n_train, dim)
    test = F.normalize(test_features.float(), dim=1)  # (n_test, dim)
    top1 = top5 = 0
    for start in range(0, test.shape[0], chunk_size):
        q = test[start : start + chunk_size]  # (c, dim)
        y = test_labels[start : start + chunk_size]
        sim, idx = (q @ train.T).topk(k, dim=1)  # (c, k)
        neighbour_labels = train_labels[idx]  # (c, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, neighbour_labels, (sim / temperature).exp())  # (c, num_classes)
        ranked = votes.argsort(dim=1, descending=True)
        top1 += (ranked[:, 0] == y).sum().item()
        top5 += (ranked[:, : min(5, num_classes)] == y[:, None]).any(dim=1).sum().item()
    n = test.shape[0]
    return top1 / n, top5 / n


def sklearn_knn_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, k: int = 5
) -> float:
    """The tutorial's classifier on precomputed features: sklearn kNN (Euclidean), accuracy."""
    estimator = KNeighborsClassifier(n_neighbors=min(k, len(x_train)))
    estimator.fit(x_train.numpy(), y_train.numpy())
    return float(accuracy_score(y_val.numpy(), estimator.predict(x_val.numpy())))
