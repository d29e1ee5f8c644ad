r"""KoLeo: a regulariser that spreads the student's embeddings over the sphere (DINOv2).

The Kozachenko-Leonenko estimator of differential entropy (Sablayrolles et al. 2019,
"Spreading vectors for similarity search") grows with the distance from each point to its
nearest neighbour. DINOv2 adds :math:`-\frac{1}{B} \sum_i \log d_i` (:math:`d_i` the distance
from L2-normalised embedding :math:`i` to the nearest other one in the batch), with weight
0.1, to the loss of the student's global crops, one global view at a time (across views, the
nearest neighbour of an image's embedding would be its other view, which DINO pulls close).
A batch whose embeddings crowd together pays for it: they spread over the sphere, and the
distances a kNN classifier compares keep more of what tells the images apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def koleo_loss(embeddings: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean negative log distance from each embedding to its nearest other one, after L2 norm.

    Args:
        embeddings: ``(n_samples, dim)`` backbone embeddings of one view, ``n_samples >= 2``.
        eps: keeps the logarithm finite when two embeddings coincide.

    Returns:
        a float32 scalar; the gradient moves every embedding away from its nearest neighbour.
        Float32 under autocast too: half precision cannot tell apart the cosines of a
        crowded batch (they differ by less than fp16's 2^-11 near 1).

    Raises:
        ValueError: for fewer than 2 samples (no neighbour) or a tensor that is not 2-D.
    """
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(
            f"koleo_loss needs (n_samples >= 2, dim) embeddings, got {tuple(embeddings.shape)}"
        )
    # autocast would run the matmul in half precision and pick a wrong neighbour for most
    # rows of a crowded batch (97% of them in tests/test_koleo.py's setting, 20 seeds)
    with torch.autocast(embeddings.device.type, enabled=False):
        x = F.normalize(embeddings.float(), dim=-1, eps=eps)  # (n, dim) on the unit sphere
        with torch.no_grad():  # which neighbour is nearest is a choice, not a function to learn
            similarity = x @ x.t()  # (n, n); the largest cosine is the smallest distance
            similarity.fill_diagonal_(-2.0)  # never one's own neighbour
            nearest = similarity.argmax(dim=1)  # (n,)
        distances = (x - x[nearest]).norm(dim=-1)  # (n,)
        return -torch.log(distances + eps).mean()
