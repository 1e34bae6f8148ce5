"""Adherence scorer for tiny-shapes: does an image show the colour and shape its prompt names?

The scorer reads pixels only: the background colour is the median of the border, the shape's
colour is the nearest palette colour to the median of the pixels farthest from it, and its kind
comes from how much of its bounding box it fills (see ``describe``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..models.shapes_data import PALETTE, SHAPES, parse_caption

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[c] for c in _NAMES], dtype=np.float32)


def _to_array(image) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1] from a PIL image, an HWC uint8 array or a CHW tensor in [-1, 1]."""
    if isinstance(image, torch.Tensor):
        return ((image.detach().float().cpu().permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255
    return arr[..., :3].astype(np.float32)


def _nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_RGB - rgb) ** 2).sum(1)))]


def describe(image) -> dict:
    """What the scorer sees: colour, shape, background, centre (x, y in [0, 1]) and fill ratio.

    Coverage α of each pixel is its position between the background and shape colours, so
    edges count fractionally; width and height are sums of per-column / per-row maximum
    coverage, which makes the fill ratio A / (W·H) accurate to well under a pixel even at 32x32
    (square 1, circle π/4, triangle 1/2).
    """
    a = _to_array(image)
    h, w, _ = a.shape
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.sqrt(((a - bg) ** 2).sum(-1))
    out = {"background": _nearest_color(bg), "color": None, "shape": None, "center": None, "fill": 0.0}
    if dist.max() < 0.25:
        return out
    core = dist > 0.5 * dist.max()
    fg = np.median(a[core], axis=0)
    out["color"] = _nearest_color(fg)
    direction = fg - bg
    alpha = np.clip(((a - bg) @ direction) / (direction @ direction), 0, 1)
    alpha[dist < 0.1 * dist.max()] = 0  # ignore faint noise away from the shape
    area = alpha.sum()
    width, height = alpha.max(axis=0).sum(), alpha.max(axis=1).sum()
    fill = area / max(width * height, 1e-6)
    ys, xs = np.mgrid[0:h, 0:w]
    out["center"] = (float((alpha * (xs + 0.5)).sum() / area) / w, float((alpha * (ys + 0.5)).sum() / area) / h)
    out["fill"] = float(fill)
    out["shape"] = "square" if fill > 0.9 else ("circle" if fill > 0.7 else "triangle")
    return out


def shapes_score(images: Sequence, prompts: Sequence[str]) -> dict:
    """Adherence of images to tiny-shapes prompts.

    Returns {"adherence": fraction with both colour and shape right, "color", "shape",
    "background": per-attribute accuracies, "n": count}. Images may be PIL images, HWC arrays
    or CHW tensors in [-1, 1].
    """
    if len(images) != len(prompts):
        raise ValueError(f"shapes_score got {len(images)} images but {len(prompts)} prompts")
    if not prompts:
        raise ValueError("shapes_score needs at least one image")
    hits = {"color": 0, "shape": 0, "background": 0, "adherence": 0}
    for image, prompt in zip(images, prompts):
        want = parse_caption(prompt)
        seen = describe(image)
        color_ok = seen["color"] == want.color
        shape_ok = seen["shape"] == want.shape
        hits["color"] += color_ok
        hits["shape"] += shape_ok
        hits["background"] += seen["background"] == want.background
        hits["adherence"] += color_ok and shape_ok
    n = len(prompts)
    return {key: value / n for key, value in hits.items()} | {"n": n}


__all__ = ["SHAPES", "describe", "shapes_score"]
