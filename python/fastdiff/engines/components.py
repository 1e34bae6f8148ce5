"""What an engine puts around its UNet: conditioners (prompts -> the UNet's conditioning
tensors), decoders (latents -> images in [-1, 1]) and `to_pil` (images -> PIL).

Each component runs its modules through the engine's backend once `accelerate(runner)` has
been called; `modules()` lists them (for weight-replacement guards and memory reports).
"""

from __future__ import annotations

import torch

from .backends import Runner


class TextConditioner:
    """CLIP tokenizer + text encoder, as diffusers' Stable Diffusion pipelines use them."""

    keys = ("encoder_hidden_states",)

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.encode_ids = self._run_text_encoder

    def _run_text_encoder(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(ids)[0]

    def accelerate(self, runner: Runner) -> None:
        """Run the text encoder through the engine's backend."""
        self.encode_ids = runner.wrap("text_encoder", self._run_text_encoder, self.text_encoder)

    def modules(self) -> list:
        return [self.text_encoder]

    def encode(self, prompts: list[str], device, dtype) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        with torch.no_grad():
            embeddings = self.encode_ids(ids)
        return {"encoder_hidden_states": embeddings.to(dtype)}


class ClassConditioner:
    """Class labels from prompts naming a class ("7", "digit 7"); the empty prompt is the
    unconditional (null) class used for guidance."""

    keys = ("class_labels",)

    def __init__(self, class_names: list[str], null_class: int):
        self.class_names = class_names
        self.null_class = null_class

    def accelerate(self, runner: Runner) -> None:
        """Nothing to accelerate: labels are looked up, not encoded."""

    def modules(self) -> list:
        return []

    def label(self, prompt: str) -> int:
        text = prompt.strip().lower()
        if text == "":
            return self.null_class
        word = text.split()[-1]
        if word in self.class_names:
            return self.class_names.index(word)
        raise ValueError(f"prompt {prompt!r} names no class: expected one of {', '.join(self.class_names)} (or '')")

    def encode(self, prompts: list[str], device, dtype) -> dict[str, torch.Tensor]:
        labels = torch.tensor([self.label(p) for p in prompts], dtype=torch.long, device=device)
        return {"class_labels": labels}


class VaeDecoder:
    """Latents -> images through an AutoencoderKL (latents / scaling_factor, then decode)."""

    def __init__(self, vae):
        self.vae = vae
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = vae.config.latent_channels
        self.decode = self._run_vae_decoder

    def _run_vae_decoder(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample

    def accelerate(self, runner: Runner) -> None:
        """Run the decoder through the engine's backend."""
        self.decode = runner.wrap("vae_decoder", self._run_vae_decoder, self.vae)

    def modules(self) -> list:
        return [self.vae]

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor)


class PixelDecoder:
    """Pixel-space models: the latent is the image."""

    factor = 1

    def __init__(self, channels: int):
        self.channels = channels

    def accelerate(self, runner: Runner) -> None:
        """Nothing to accelerate."""

    def modules(self) -> list:
        return []

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


def to_pil(images: torch.Tensor) -> list:
    """[-1, 1] NCHW tensors -> PIL images (RGB, or L for one channel)."""
    from PIL import Image

    arr = ((images.float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB") for a in arr]
