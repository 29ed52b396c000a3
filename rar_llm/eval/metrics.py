"""Distances between sets of images and memorisation checks, on any features (numpy / torch only).

Fréchet distance (FID's formula), improved precision / recall (Kynkäänniemi et al. 2019), exact
copies of training samples and nearest-neighbour distances; ``rar_llm.eval.evaluate`` and
``rar_llm.eval.inception`` compute features, these compare them.
"""

from __future__ import annotations

import numpy as np
import torch


# ---- distances between sets of images ---------------------------------------------------------------
def _gaussian(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if len(x) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 samples per set, got {len(x)}")
    return x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians, ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^1/2)``.

    ``tr (C1 C2)^1/2 = tr (C1^1/2 C2 C1^1/2)^1/2``, and both roots are of symmetric PSD matrices, so
    two symmetric eigendecompositions in float64 give it with no complex parts (which ``sqrtm`` of
    the non-symmetric ``C1 C2`` produces from rounding on near-singular covariances).
    """
    w, v = np.linalg.eigh(cov1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root @ cov2 @ root
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum()
    fd = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)
    return max(fd, 0.0)  # only rounding makes it negative


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of features (rows are samples)."""
    (mu1, cov1), (mu2, cov2) = _gaussian(a), _gaussian(b)
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature sets of different widths: {np.shape(a)} vs {np.shape(b)}; compare like with like")
    return frechet_from_stats(mu1, cov1, mu2, cov2)


def _min_distance(
    x: torch.Tensor, ref: torch.Tensor, offset: torch.Tensor | None = None, chunk: int = 256
) -> torch.Tensor:
    """``min_j |x_i - ref_j| - offset_j`` per row of ``x``, in chunks so 50k x 50k sets fit in memory."""
    out = []
    for xs in x.split(chunk):
        d = torch.cdist(xs, ref)
        out.append((d if offset is None else d - offset).min(1).values)
    return torch.cat(out)


def _knn_radius(x: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row."""
    if len(x) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set, got {len(x)}")
    return torch.cat([torch.cdist(xs, x).kthvalue(k + 1, dim=1).values for xs in x.split(chunk)])


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, k=3 as ADM's evaluator).

    Precision: share of fake samples inside the real manifold (the union of balls reaching each real
    sample's k-th neighbour); recall: share of real samples inside the fake manifold.
    """
    r = torch.as_tensor(np.asarray(real, dtype=np.float64)).flatten(1)
    f = torch.as_tensor(np.asarray(fake, dtype=np.float64)).flatten(1)
    precision = (_min_distance(f, r, _knn_radius(r, k)) <= 0).double().mean().item()
    recall = (_min_distance(r, f, _knn_radius(f, k)) <= 0).double().mean().item()
    return precision, recall


# ---- memorisation -------------------------------------------------------------------------------------
def _rows(codes: np.ndarray) -> list[bytes]:
    return [r.tobytes() for r in np.ascontiguousarray(np.asarray(codes, dtype=np.int64).reshape(len(codes), -1))]


def copies(codes: np.ndarray, train_codes: np.ndarray) -> np.ndarray:
    """``(N,)`` bools: which code grids equal a training grid in every code."""
    seen = set(_rows(train_codes))
    return np.array([r in seen for r in _rows(codes)], dtype=bool)


def nearest_distance(images: np.ndarray, train_images: np.ndarray) -> np.ndarray:
    """``(N,)`` L2 pixel distance of each image to its nearest training image."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float64)).flatten(1)
    return _min_distance(x, torch.as_tensor(np.asarray(train_images, dtype=np.float64)).flatten(1)).numpy()
