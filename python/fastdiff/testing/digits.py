"""Yardsticks for the digits model: classifier accuracy of samples and a feature-space Fréchet
distance to the real data (the FID recipe of Heusel et al. 2017, with the shipped digits
classifier's 128-d penultimate features in place of Inception's)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..models.digits import DigitsClassifier, load_classifier, load_data
from ..models.loading import engines_dir


def _as_tensor(images) -> torch.Tensor:
    """[N, 1, 8, 8] float in [-1, 1] from a tensor or a list of PIL 'L' images."""
    if isinstance(images, torch.Tensor):
        return images.float().cpu()
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr)[:, None]


def classifier(path=None) -> DigitsClassifier:
    return load_classifier(path or engines_dir() / "digits")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2(Σ_a Σ_b)^½) between Gaussians fitted to two feature sets."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [n >= 2, d] feature arrays of equal d, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.all(np.isfinite(root)):
        eps = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


def digits_accuracy(images, labels: Sequence[int], model: DigitsClassifier | None = None) -> float:
    """Share of images the classifier reads as their intended digit."""
    model = model or classifier()
    with torch.no_grad():
        predicted = model(_as_tensor(images)).argmax(1)
    return float((predicted == torch.as_tensor(list(labels))).float().mean())


def digits_fd(images, model: DigitsClassifier | None = None) -> float:
    """Fréchet distance between the classifier features of images and of the real digits."""
    model = model or classifier()
    real, _ = load_data()
    with torch.no_grad():
        return frechet_distance(model.features(_as_tensor(images)).numpy(), model.features(real).numpy())
