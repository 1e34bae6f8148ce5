"""Fidelity of accelerated images to the same run without acceleration: PSNR and SSIM of the 8-bit
images, pooled over a batch, per image, and for the worst image.

PSNR over a batch is reported three ways: pooled (from the mean squared error of all pixels of all
images, the usual figure), the median image and the worst image, because a method can keep the
pooled figure high while changing a few images visibly. SSIM is Wang et al.'s structural
similarity (IEEE TIP 2004, eq. 13) with a 7x7 uniform window over the valid region, constants
K1 = 0.01, K2 = 0.03 and data range 1, averaged over the window positions and the channels of
each image (scikit-image's structural_similarity defaults).
"""

from __future__ import annotations

import numpy as np

SSIM_WINDOW = 7
PSNR_CAP = 100.0  # dB reported for identical images (an MSE of 0 has no finite PSNR)


def to_pixels(images) -> np.ndarray:
    """PIL images (or arrays) -> float64 [B, H, W, C] in [0, 1] (8-bit values / 255)."""
    arrays = []
    for image in images:
        a = np.asarray(image, dtype=np.float64)
        arrays.append((a[..., None] if a.ndim == 2 else a) / 255.0)
    if not arrays:
        raise ValueError("no images")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"images of different sizes: {sorted(shapes)}")
    return np.stack(arrays)


def psnr(mse) -> float:
    """10·log10(1 / mse) for pixels in [0, 1]; PSNR_CAP when mse is 0."""
    mse = float(mse)
    return PSNR_CAP if mse <= 0 else min(PSNR_CAP, float(10 * np.log10(1.0 / mse)))


def _window_means(x: np.ndarray, w: int) -> np.ndarray:
    """Means over every w×w window of x [B, H, W, C] (valid positions), by summed-area tables."""
    s = np.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0))).cumsum(1).cumsum(2)
    total = s[:, w:, w:] - s[:, :-w, w:] - s[:, w:, :-w] + s[:, :-w, :-w]
    return total / (w * w)


def ssim(a: np.ndarray, b: np.ndarray, window: int = SSIM_WINDOW) -> np.ndarray:
    """Per-image SSIM of pixel arrays a, b [B, H, W, C] in [0, 1]; the window shrinks to the
    image's smaller side (odd) for images smaller than it."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two [B, H, W, C] arrays of one shape, got {a.shape} and {b.shape}")
    w = min(window, a.shape[1], a.shape[2])
    w -= 1 - w % 2  # odd
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _window_means(a, w), _window_means(b, w)
    n = w * w
    cov = n / (n - 1)  # sample covariances, as scikit-image
    var_a = cov * (_window_means(a * a, w) - mu_a**2)
    var_b = cov * (_window_means(b * b, w) - mu_b**2)
    cov_ab = cov * (_window_means(a * b, w) - mu_a * mu_b)
    s = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.reshape(s.shape[0], -1).mean(axis=1)


def fidelity(images, reference) -> dict:
    """PSNR (pooled, median, worst) and SSIM (mean, worst) of `images` against `reference` (PIL
    images or arrays, same order), and how many came out identical."""
    a, b = to_pixels(images), to_pixels(reference)
    if a.shape != b.shape:
        raise ValueError(f"{a.shape[0]} images of {a.shape[1:]} against {b.shape[0]} references of {b.shape[1:]}")
    mse = ((a - b) ** 2).reshape(a.shape[0], -1).mean(axis=1)
    per_image = [psnr(m) for m in mse]
    s = ssim(a, b)
    return {
        "psnr": psnr(mse.mean()),
        "psnr_median": float(np.median(per_image)),
        "psnr_worst": min(per_image),
        "ssim": float(s.mean()),
        "ssim_worst": float(s.min()),
        "identical": int((mse == 0).sum()),
        "images": int(a.shape[0]),
    }
