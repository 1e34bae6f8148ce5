"""Training of tiny-shapes: the VAE on rendered scenes, then the UNet and text encoder jointly on
the VAE's latents; ``train`` builds, trains and saves the whole pipeline from a seed."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ...schedules import DiscreteSchedule
from ..shapes_data import random_scenes, render
from ..tiny_shapes import (
    DEFAULT_GUIDANCE,
    IMAGE_SIZE,
    SCHEDULER_CONFIG,
    Components,
    build_components,
    encode_text,
    save_pipeline,
)
from .common import EMA, cosine_lr


def train_vae(components: Components, steps: int, batch: int, seed: int, progress=None) -> dict:
    """L1 reconstruction (sharper edges than MSE) + a small KL term, as in latent diffusion's
    KL autoencoders (without their perceptual and adversarial terms)."""
    vae = components.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    log = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3)
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


def encode_dataset(components: Components, n: int, seed: int, batch: int = 256):
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
    schedule = DiscreteSchedule.from_config(SCHEDULER_CONFIG)
    ac = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    scaling = components.vae.config.scaling_factor
    means, stds, captions = encode_dataset(components, dataset_size, seed + 1)
    unet, text_encoder = components.unet.train(), components.text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-4)
    ema_unet, ema_text = EMA(unet, 0.999), EMA(text_encoder, 0.999)
    g = torch.Generator().manual_seed(seed)
    log = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 5e-4)
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
