"""tiny-shapes: a small text-to-image latent diffusion model in diffusers' Stable Diffusion layout.

32x32 RGB images of one coloured shape on a plain background, an AutoencoderKL with a factor-4
latent (8x8x4), a UNet2DConditionModel with cross-attention, a 2-layer CLIP text
encoder with a word-level CLIP BPE tokenizer, and SD 2.1's noise schedule with v-prediction.
``train`` builds and trains all of it from a seed; ``python -m fastdiff.models.train tiny-shapes``
is the command line. Components are built by diffusers/transformers, so
``StableDiffusionPipeline.from_pretrained(<dir>)`` loads the result.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..schedules import PRESETS
from .shapes_data import COLORS, POSITIONS, SHAPES, random_scenes, render
from .tokenizer import word_level_bpe, write_tokenizer

IMAGE_SIZE = 32  # small enough to train on 2 CPU cores in about an hour
MAX_TOKENS = 16
WORDS = ("a", "an", "on", "at", "the", "of", "background", *COLORS, *SHAPES, *POSITIONS)
DEFAULT_GUIDANCE = 1.5

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "sample_size": IMAGE_SIZE,
}

UNET_CONFIG = {
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}

# SD 2.1's scheduler (DDIM config, v-prediction), with "trailing" spacing so that every sampler
# starts from the noisiest timestep.
SCHEDULER_CONFIG = {
    **PRESETS["sd21"],
    "_class_name": "DDIMScheduler",
    "timestep_spacing": "trailing",
}


def text_encoder_config(vocab_size: int, bos: int, eos: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": MAX_TOKENS,
        "projection_dim": 64,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": eos,
    }


@dataclass
class Components:
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object


def build_components(tokenizer_dir: Path, seed: int = 0) -> Components:
    """Freshly initialised components (weights from `seed`); the tokenizer is written to
    tokenizer_dir."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = word_level_bpe(WORDS)
    write_tokenizer(tokenizer_dir, vocab, merges, model_max_length=MAX_TOKENS)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    config = text_encoder_config(len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    return Components(vae, unet, text_encoder, tokenizer)


def encode_text(components: Components, captions: list[str]) -> torch.Tensor:
    ids = components.tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids
    return components.text_encoder(ids)[0]


class _EMA:
    """Exponential moving average of a module's parameters (used for the shipped weights)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1 - self.decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(self.shadow)


def _lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(components: Components, steps: int, batch: int, seed: int, progress=None) -> dict:
    """L1 reconstruction (sharper edges than MSE) + a small KL term, as in latent diffusion's
    KL autoencoders (without their perceptual and adversarial terms)."""
    vae = components.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    log = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 1e-3)
        images = render(random_scenes(batch, g), IMAGE_SIZE, g)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=g)).sample
        l1 = (recon - images).abs().mean()
        kl = posterior.kl().mean() / images[0].numel()
        loss = l1 + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log = {"l1": l1.item(), "kl": kl.item()}
        if progress is not None:
            progress.update(1)
            progress.set_postfix(log)
    vae.eval()
    with torch.no_grad():
        images = render(random_scenes(512, g), IMAGE_SIZE, g)
        latents = vae.encode(images).latent_dist.sample(generator=g)
        scaling = 1.0 / float(latents.std())
        vae.register_to_config(scaling_factor=scaling)
        recon = vae.decode(latents).sample
    return {**log, "scaling_factor": scaling, "eval_mse": float(torch.nn.functional.mse_loss(recon, images))}


def _encode_dataset(components: Components, n: int, seed: int, batch: int = 256):
    """Latent moments and captions of n fresh scenes (the UNet samples from the moments)."""
    g = torch.Generator().manual_seed(seed)
    means, stds, captions = [], [], []
    with torch.no_grad():
        for start in range(0, n, batch):
            scenes = random_scenes(min(batch, n - start), g)
            dist = components.vae.encode(render(scenes, IMAGE_SIZE, g)).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            captions += [s.caption for s in scenes]
    return torch.cat(means), torch.cat(stds), captions


def train_unet(
    components: Components,
    steps: int,
    batch: int,
    seed: int,
    dataset_size: int,
    progress=None,
    cfg_dropout: float = 0.1,
    snr_gamma: float = 5.0,
) -> dict:
    """v-prediction on SD 2.1's schedule with min-SNR-γ weighting (Hang et al. 2023) and 10%
    empty prompts for classifier-free guidance; the text encoder trains jointly. The shipped
    weights are the EMA (decay 0.999) of both."""
    from ..schedules import DiscreteSchedule

    schedule = DiscreteSchedule.from_config(SCHEDULER_CONFIG)
    ac = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    scaling = components.vae.config.scaling_factor
    means, stds, captions = _encode_dataset(components, dataset_size, seed + 1)
    unet, text_encoder = components.unet.train(), components.text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-4)
    ema_unet, ema_text = _EMA(unet, 0.999), _EMA(text_encoder, 0.999)
    g = torch.Generator().manual_seed(seed)
    log = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 5e-4)
        idx = torch.randint(0, len(captions), (batch,), generator=g)
        x0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=g)) * scaling
        drop = torch.rand(batch, generator=g) < cfg_dropout
        text = ["" if d else captions[i] for d, i in zip(drop.tolist(), idx.tolist())]
        t = torch.randint(0, len(ac), (batch,), generator=g)
        a = ac[t].sqrt()[:, None, None, None]
        s = (1 - ac[t]).sqrt()[:, None, None, None]
        noise = torch.randn(x0.shape, generator=g)
        target = a * noise - s * x0
        pred = unet(a * x0 + s * noise, t, encoder_hidden_states=encode_text(components, text)).sample
        snr = ac[t] / (1 - ac[t])
        weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)
        loss = (weight * ((pred - target) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        log = {"loss": loss.item()}
        if progress is not None:
            progress.update(1)
            progress.set_postfix(log)
    ema_unet.copy_to(unet)
    ema_text.copy_to(text_encoder)
    unet.eval()
    text_encoder.eval()
    return log


def save_pipeline(components: Components, out: Path, *, dtype=torch.float16, info: dict | None = None) -> Path:
    """Write a diffusers StableDiffusionPipeline directory with fp16 safetensors weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=components.vae.to(dtype),
        text_encoder=components.text_encoder.to(dtype),
        tokenizer=components.tokenizer,
        unet=components.unet.to(dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # The weights stay fp16 on disk, but transformers loads a text encoder in the dtype its
    # config names, while diffusers loads its models in float32 unless told otherwise; naming
    # float32 keeps a plain from_pretrained(dir) consistent (torch_dtype=float16 still works).
    config_path = Path(out) / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if info is not None:
        (Path(out) / "fastdiff.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return Path(out)


def train(
    out: str | Path,
    *,
    seed: int = 0,
    vae_steps: int = 3000,
    unet_steps: int = 8000,
    batch: int = 64,
    dataset_size: int = 30000,
    show_progress: bool = True,
) -> dict:
    """Build, train and save tiny-shapes; returns the training report (also in fastdiff.json)."""
    from tqdm import tqdm

    out = Path(out)
    started = time.time()
    components = build_components(out / "tokenizer", seed)
    with tqdm(total=vae_steps, desc="vae", disable=not show_progress) as bar:
        vae_log = train_vae(components, vae_steps, max(8, batch // 2), seed, bar)
    for p in components.vae.parameters():
        p.requires_grad_(False)
    with tqdm(total=unet_steps, desc="unet+text", disable=not show_progress) as bar:
        unet_log = train_unet(components, unet_steps, batch, seed, dataset_size, bar)
    info = {
        "model": "tiny-shapes",
        "seed": seed,
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "batch": batch,
        "dataset_size": dataset_size,
        "vae": vae_log,
        "unet": unet_log,
        "default_guidance_scale": DEFAULT_GUIDANCE,
        "train_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    save_pipeline(components, out, info=info)
    return info
