"""Procedural captioned images for tiny-shapes: one coloured shape on a plain background.

Captions follow a small grammar, e.g. "a red circle on a blue background" or
"an orange square at the left of a blue background". Images are rendered with 4x4 supersampling
(anti-aliased edges) in float32 [-1, 1], NCHW, on any device, from a seed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

# sRGB in [0, 1]; chosen to be far apart so that a scorer can name them from pixels
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.15, 0.70, 0.20),
    "blue": (0.15, 0.25, 0.85),
    "yellow": (0.95, 0.88, 0.15),
    "purple": (0.55, 0.20, 0.70),
    "orange": (0.98, 0.55, 0.10),
    "white": (0.96, 0.96, 0.96),
    "black": (0.06, 0.06, 0.06),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
_CENTERS = {"left": (0.34, 0.5), "right": (0.66, 0.5), "top": (0.5, 0.34), "bottom": (0.5, 0.66), "center": (0.5, 0.5)}
RADIUS = (0.22, 0.3)  # of the image size: large enough that 32x32 images keep the corners

_CAPTION = re.compile(
    r"^an? (?P<color>\w+) (?P<shape>\w+)(?: at the (?P<position>\w+) of| on) an? (?P<background>\w+) background$"
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    background: str
    position: str | None = None  # None: anywhere

    @property
    def caption(self) -> str:
        where = f"at the {self.position} of" if self.position else "on"
        thing = f"{_article(self.color)} {self.color} {self.shape}"
        return f"{thing} {where} {_article(self.background)} {self.background} background"


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes; ValueError for text outside the grammar."""
    m = _CAPTION.match(caption.strip().lower())
    if not m:
        raise ValueError(
            f"caption {caption!r} is not in the tiny-shapes grammar: "
            "'a <colour> <shape> on a <colour> background' or "
            "'a <colour> <shape> at the <position> of a <colour> background'"
        )
    scene = Scene(m["color"], m["shape"], m["background"], m["position"])
    for value, allowed, what in (
        (scene.color, COLORS, "colour"),
        (scene.background, COLORS, "background colour"),
        (scene.shape, SHAPES, "shape"),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {what} {value!r} in {caption!r}: expected one of {', '.join(allowed)}")
    if scene.position is not None and scene.position not in POSITIONS:
        raise ValueError(f"unknown position {scene.position!r} in {caption!r}: expected one of {', '.join(POSITIONS)}")
    return scene


def all_scenes() -> list[Scene]:
    """Every scene of the grammar (shape colour != background colour), positioned or not."""
    return [Scene(c, s, b, p) for c in COLORS for s in SHAPES for b in COLORS if b != c for p in (None, *POSITIONS)]


def random_scenes(n: int, generator: torch.Generator, p_position: float = 0.5) -> list[Scene]:
    """n scenes drawn uniformly (a position is named with probability p_position)."""
    idx = torch.randint(0, 1 << 30, (n, 5), generator=generator).tolist()
    rand = torch.rand(n, generator=generator).tolist()
    scenes = []
    for (ci, si, bi, pi, _), r in zip(idx, rand):
        color = COLORS[ci % len(COLORS)]
        background = [c for c in COLORS if c != color][bi % (len(COLORS) - 1)]
        position = POSITIONS[pi % len(POSITIONS)] if r < p_position else None
        scenes.append(Scene(color, SHAPES[si % len(SHAPES)], background, position))
    return scenes


def render(scenes: list[Scene], size: int = 64, generator: torch.Generator | None = None, jitter: bool = True):
    """Images of the scenes, float32 [n, 3, size, size] in [-1, 1].

    Each shape has a random size (radius RADIUS of the image) and, with jitter, a small random
    offset; unpositioned scenes are placed anywhere the shape fits.
    """
    n = len(scenes)
    g = generator
    u = torch.rand(n, 4, generator=g)
    radius = RADIUS[0] + (RADIUS[1] - RADIUS[0]) * u[:, 0]
    centers = torch.empty(n, 2)
    for i, s in enumerate(scenes):
        if s.position is None:
            lo, hi = radius[i].item() + 0.01, 1 - radius[i].item() - 0.01
            centers[i] = torch.tensor([lo, lo]) + (hi - lo) * u[i, 1:3]
        else:
            centers[i] = torch.tensor(_CENTERS[s.position])
            if jitter:
                centers[i] += 0.05 * (u[i, 1:3] - 0.5)
    ss = 4  # supersampling factor
    coords = (torch.arange(size * ss, dtype=torch.float32) + 0.5) / (size * ss)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx = xx[None] - centers[:, 0, None, None]
    dy = yy[None] - centers[:, 1, None, None]
    r = radius[:, None, None]
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes])[:, None, None]
    circle = dx**2 + dy**2 <= r**2
    square = torch.maximum(dx.abs(), dy.abs()) <= r * 0.85
    # upward-pointing equilateral-ish triangle with apex at the top
    tri = (dy <= 0.8 * r) & (dy >= -r + 2 * dx.abs() * 1.0)
    mask = torch.where(kind == 0, circle, torch.where(kind == 1, square, tri)).float()
    mask = torch.nn.functional.avg_pool2d(mask[:, None], ss)[:, 0]  # anti-aliased coverage
    fg = torch.tensor([PALETTE[s.color] for s in scenes])[:, :, None, None]
    bg = torch.tensor([PALETTE[s.background] for s in scenes])[:, :, None, None]
    image = bg + (fg - bg) * mask[:, None]
    return image * 2 - 1
