"""Training data for distillation: what the student's z_t = α·x_0 + σ·ε start from (Meng et al.
train both stages on the data set's images, as the teacher was trained).

`for_engine(engine)` returns an object with sample(batch, generator) -> (x_0 [B, C, h, w] in the
engine's latent space, float32; prompts: list of B strings for the engine's conditioner).
"""

from __future__ import annotations

import torch

from .train import DistillError


class DigitsData:
    """scikit-learn's 8x8 digits (bundled with scikit-learn), the prompt of each image its class."""

    def __init__(self):
        from ..models.digits import CLASS_NAMES, load_data

        self.images, self.labels = load_data()
        self.names = CLASS_NAMES

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(0, len(self.labels), (batch,), generator=generator)
        return self.images[idx], [self.names[int(i)] for i in self.labels[idx]]


class ShapesData:
    """tiny-shapes' procedural scenes, as its UNet was trained on them: `size` scenes rendered and
    encoded once by the model's VAE (their latent moments), each draw a fresh latent sample
    scaled by the VAE's scaling factor; the prompt of each image its caption."""

    def __init__(self, vae, size: int = 4096, seed: int = 0):
        from types import SimpleNamespace

        from ..models.training.tiny_shapes import encode_dataset

        self.means, self.stds, self.captions = encode_dataset(SimpleNamespace(vae=vae), size, seed)
        self.scaling = float(vae.config.scaling_factor)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        idx = torch.randint(0, len(self.captions), (batch,), generator=generator)
        noise = torch.randn(self.means[idx].shape, generator=generator)
        return (self.means[idx] + self.stds[idx] * noise) * self.scaling, [self.captions[int(i)] for i in idx]


def for_engine(engine):
    """The training data of a shipped model (digits, tiny-shapes); others name what is missing."""
    if engine.name == "digits":
        return DigitsData()
    if engine.name == "tiny-shapes":
        import copy

        return ShapesData(copy.deepcopy(engine.decoder.vae).to("cpu", torch.float32))  # the engine's stays as it is
    raise DistillError(
        f"no distillation data for the model {engine.name!r}: distillation is implemented for digits (its data set "
        "ships with scikit-learn) and tiny-shapes (procedural scenes); pass data= an object with "
        "sample(batch, generator) -> (x_0 latents, prompts)"
    )
