"""What an engine puts around its UNet: conditioners (prompts -> the UNet's conditioning
tensors), decoders (latents -> images in [-1, 1]) and `to_pil` (images -> PIL).

Each component runs its modules through the engine's backend once `accelerate(runner)` has
been called; `modules()` lists them (for weight-replacement guards and memory reports).
"""

from __future__ import annotations

import warnings

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


def guidance_features(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the guidance weight w ([B] -> [B, dim] float32), exactly as diffusers'
    pipelines make them for a UNet with `time_cond_proj_dim` (get_guidance_scale_embedding of
    w - 1: diffusers' guidance_scale w is 1 + the w of Meng et al. 2023, whose Fourier embedding of
    w this is)."""
    w = (w.float().reshape(-1) - 1) * 1000.0
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step).to(w.device)
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class ClassGuidanceEmbedding(torch.nn.Module):
    """A class-conditional UNet2DModel student's conditioning vector: the teacher's class embedding
    plus an MLP of w's sinusoidal features (zero at initialisation, so the student starts as the
    teacher). The student's UNet takes it as `class_labels` (class_embed_type="identity"), i.e.
    added to the time embedding, where Meng et al. 2023 (stage 1) put the embedding of w."""

    def __init__(self, num_classes: int, dim: int, features: int = 256):
        super().__init__()
        self.config = {"num_classes": num_classes, "dim": dim, "features": features}
        self.classes = torch.nn.Embedding(num_classes, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(features, dim), torch.nn.SiLU(), torch.nn.Linear(dim, dim))
        torch.nn.init.zeros_(self.mlp[2].weight)
        torch.nn.init.zeros_(self.mlp[2].bias)

    def forward(self, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        feats = guidance_features(w, self.config["features"]).to(self.mlp[0].weight.dtype)
        return self.classes(labels) + self.mlp(feats)


class GuidanceConditioner:
    """The conditioning of a guidance-distilled student (Meng et al. 2023, stage 1): the base
    conditioner's tensors with the guidance weight w embedded, so that one UNet call per step
    gives the guided output and w is chosen at sampling time. `embedding` is a
    ClassGuidanceEmbedding (class-conditional UNet2DModel students: `class_labels` becomes its
    vector), or None for a UNet2DConditionModel with `time_cond_proj_dim` (w's features go in as
    `timestep_cond`, as diffusers' pipelines pass them). `w_range`: the weights it was trained
    on; others warn."""

    embeds_guidance = True

    def __init__(self, base, w_range: tuple[float, float], *, embedding=None, cond_dim: int | None = None):
        if (embedding is None) == (cond_dim is None):
            raise ValueError("a guidance conditioner needs either a class embedding or the UNet's time_cond_proj_dim")
        self.base, self.embedding, self.cond_dim = base, embedding, cond_dim
        self.w_range = (float(w_range[0]), float(w_range[1]))
        self.keys = base.keys if embedding is not None else (*base.keys, "timestep_cond")

    def accelerate(self, runner: Runner) -> None:
        self.base.accelerate(runner)

    def modules(self) -> list:
        return [*self.base.modules(), *([self.embedding] if self.embedding is not None else [])]

    def weights(self, w, batch: int, device) -> torch.Tensor:
        """w as a float32 [batch] tensor (a float or one per sample); a w outside the trained range warns."""
        w = torch.as_tensor(w, dtype=torch.float32, device=device).reshape(-1)
        w = w.expand(batch) if w.numel() == 1 else w
        if w.numel() != batch:
            raise ValueError(f"{w.numel()} guidance weights for a batch of {batch}")
        lo, hi = self.w_range
        if bool(torch.any((w < lo - 1e-6) | (w > hi + 1e-6))):
            warnings.warn(
                f"fastdiff: guidance {sorted(set(w.tolist()))} is outside the range this student was distilled "
                f"on ([{lo:g}, {hi:g}]); its outputs there are extrapolated",
                RuntimeWarning,
                stacklevel=3,
            )
        return w

    def encode(self, prompts: list[str], device, dtype, guidance=None) -> dict[str, torch.Tensor]:
        w = self.weights(self.w_range[0] if guidance is None else guidance, len(prompts), device)
        cond = self.base.encode(prompts, device, dtype)
        if self.embedding is None:
            return {**cond, "timestep_cond": guidance_features(w, self.cond_dim).to(dtype)}
        with torch.no_grad():
            vector = self.embedding(cond["class_labels"], w)
        return {**cond, "class_labels": vector.to(dtype)}


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
