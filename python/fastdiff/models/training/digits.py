"""Training of digits: the digits classifier (the adherence and Fréchet-distance yardstick) and the
class-conditional UNet; ``train`` reproduces both from a seed and saves them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ...schedules import DiscreteSchedule
from ..digits import DEFAULT_GUIDANCE, NULL_CLASS, SCHEDULER_CONFIG, UNET_CONFIG, DigitsClassifier, load_data
from ..loading import need
from .common import EMA, cosine_lr


def train_classifier(images, labels, seed: int, steps: int = 1500, progress=None) -> tuple[DigitsClassifier, dict]:
    """Train on 80% (with small noise and shift augmentation), report accuracy on the other 20%."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    split = int(0.8 * len(labels))
    train_idx, test_idx = order[:split], order[split:]
    torch.manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = train_idx[torch.randint(0, split, (128,), generator=g)]
        x = images[idx] + 0.1 * torch.randn(images[idx].shape, generator=g)
        shift = torch.randint(-1, 2, (2,), generator=g).tolist()
        x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = torch.nn.functional.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1)
    model.eval()
    with torch.no_grad():
        accuracy = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
    return model, {"heldout_accuracy": accuracy, "heldout_size": len(test_idx)}


def train_unet(images, labels, seed: int, steps: int, batch: int = 128, progress=None, cfg_dropout=0.1):
    """v-prediction with min-SNR-5 weighting and 10% null-class labels; returns the EMA UNet."""
    diffusers = need("diffusers", "the digits model")

    schedule = DiscreteSchedule.from_config(SCHEDULER_CONFIG)
    ac = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**UNET_CONFIG).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-4)
    ema = EMA(unet, 0.999)
    g = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3)
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        x0 = images[idx]
        y = torch.where(torch.rand(batch, generator=g) < cfg_dropout, NULL_CLASS, labels[idx])
        t = torch.randint(0, len(ac), (batch,), generator=g)
        a = ac[t].sqrt()[:, None, None, None]
        s = (1 - ac[t]).sqrt()[:, None, None, None]
        noise = torch.randn(x0.shape, generator=g)
        pred = unet(a * x0 + s * noise, t, class_labels=y).sample
        snr = ac[t] / (1 - ac[t])
        weight = torch.clamp(snr, max=5.0) / (snr + 1)
        loss = (weight * ((pred - (a * noise - s * x0)) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.update(unet)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=loss.item())
    ema.copy_to(unet)
    return unet.eval(), {"loss": loss.item()}


def save(out: Path, unet, classifier: DigitsClassifier, info: dict) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    unet.to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=1) + "\n")
    (out / "classifier").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, out / "classifier" / "model.safetensors")
    (out / "fastdiff.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return out


def train(out, *, seed: int = 0, unet_steps: int = 4000, classifier_steps: int = 1500, show_progress=True) -> dict:
    from tqdm import tqdm

    started = time.time()
    images, labels = load_data()
    with tqdm(total=classifier_steps, desc="classifier", disable=not show_progress) as bar:
        classifier, classifier_log = train_classifier(images, labels, seed, classifier_steps, bar)
    with tqdm(total=unet_steps, desc="unet", disable=not show_progress) as bar:
        unet, unet_log = train_unet(images, labels, seed, unet_steps, progress=bar)
    info = {
        "model": "digits",
        "seed": seed,
        "unet_steps": unet_steps,
        "classifier_steps": classifier_steps,
        "classifier": classifier_log,
        "unet": unet_log,
        "default_guidance_scale": DEFAULT_GUIDANCE,
        "train_seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    save(out, unet, classifier, info)
    return info
