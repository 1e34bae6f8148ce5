"""digits: a class-conditional pixel-space diffusion model on scikit-learn's 8x8 digits.

A diffusers UNet2DModel with 11 class embeddings (the ten digits and a null class for
classifier-free guidance), v-prediction on the cosine schedule. Shipped in engines/digits/ with
a small CNN digits classifier whose penultimate features define a Fréchet distance
(fastdiff.testing.digits). ``train`` reproduces both from a seed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..engines.engine import ClassConditioner, Engine, PixelDecoder
from ..schedules import DiscreteSchedule
from .registry import ModelNotFoundError, _need

CLASS_NAMES = [str(d) for d in range(10)]
NULL_CLASS = 10
DEFAULT_GUIDANCE = 2.0

UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 2,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "num_class_embeds": len(CLASS_NAMES) + 1,
    "norm_num_groups": 8,
}

SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "timestep_spacing": "trailing",
}


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float32 [1797, 1, 8, 8] in [-1, 1] and int64 labels (bundled
    with scikit-learn: no download)."""
    datasets = _need("sklearn.datasets", "the digits model")
    data = datasets.load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    return images, torch.tensor(data.target, dtype=torch.long)


class DigitsClassifier(torch.nn.Module):
    """Small CNN for 8x8 digits; ``features`` (128-d, penultimate layer) feed the Fréchet distance."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
            torch.nn.SiLU(),
            torch.nn.Flatten(),
            torch.nn.Linear(64 * 4 * 4, 128),
            torch.nn.SiLU(),
        )
        self.head = torch.nn.Linear(128, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


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
    diffusers = _need("diffusers", "the digits model")
    from .tiny_shapes import _EMA, _lr

    schedule = DiscreteSchedule.from_config(SCHEDULER_CONFIG)
    ac = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**UNET_CONFIG).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-4)
    ema = _EMA(unet, 0.999)
    g = torch.Generator().manual_seed(seed)
    loss = torch.zeros(())
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 1e-3)
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


def load_classifier(path: Path) -> DigitsClassifier:
    from safetensors.torch import load_file

    file = Path(path) / "classifier" / "model.safetensors"
    if not file.is_file():
        raise ModelNotFoundError(f"digits classifier weights missing: {file}")
    model = DigitsClassifier()
    model.load_state_dict(load_file(file))
    return model.eval()


def load_engine(path: Path, device, dtype, sampler: str, backend: str) -> Engine:
    diffusers = _need("diffusers", "the digits model")
    path = Path(path)
    if not (path / "unet" / "config.json").is_file():
        raise ModelNotFoundError(
            f"digits weights missing from {path}: re-clone the repository, or retrain with "
            f"`python -m fastdiff.models.train digits --out {path}`"
        )
    unet = diffusers.UNet2DModel.from_pretrained(path / "unet", torch_dtype=dtype).to(device).eval()
    info = json.loads((path / "fastdiff.json").read_text()) if (path / "fastdiff.json").is_file() else {}
    return Engine(
        name="digits",
        unet=unet,
        conditioner=ClassConditioner(CLASS_NAMES, NULL_CLASS),
        decoder=PixelDecoder(1),
        schedule=DiscreteSchedule.from_file(path / "scheduler"),
        sample_size=UNET_CONFIG["sample_size"],
        device=device,
        dtype=dtype,
        sampler=sampler,
        guidance_scale=info.get("default_guidance_scale", DEFAULT_GUIDANCE),
        backend=backend,
        plans_dir=path / "plans",
    )
