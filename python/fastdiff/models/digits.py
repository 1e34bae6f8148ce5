"""digits: a class-conditional pixel-space diffusion model on scikit-learn's 8x8 digits.

A diffusers UNet2DModel with 11 class embeddings (the ten digits and a null class for
classifier-free guidance), v-prediction on the cosine schedule. Shipped in engines/digits/ with
a small CNN digits classifier whose penultimate features define a Fréchet distance
(fastdiff.testing.digits). fastdiff.models.training.digits reproduces both from a seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..engines.components import ClassConditioner, PixelDecoder
from ..engines.engine import Engine
from .loading import (
    ModelLoadError,
    ModelNotFoundError,
    engines_dir,
    load_model_component,
    load_schedule,
    model_info,
    need,
    student_conditioner,
    student_options,
)

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
    datasets = need("sklearn.datasets", "the digits model")
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


def load_classifier(path: Path) -> DigitsClassifier:
    from safetensors.torch import load_file

    file = Path(path) / "classifier" / "model.safetensors"
    if not file.is_file():
        raise ModelNotFoundError(f"digits classifier weights missing: {file}")
    model = DigitsClassifier()
    try:
        model.load_state_dict(load_file(file))
    except Exception as exc:  # safetensors and torch raise several types for a damaged or mismatched file
        raise ModelLoadError(f"{file} cannot be loaded as the digits classifier: {exc}") from exc
    return model.eval()


def load_engine(
    weights=None, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False, **engine_options
) -> Engine:
    """digits from engines/digits, or from weights (a directory that training or `fastdiff distill`
    wrote: a guidance-distilled student takes the guidance weight as an input); engine_options
    (sampler, backend, ...) go to the Engine. The directory is loaded strictly (ModelLoadError
    naming what is damaged); allow_pickle: also load a pickle unet/diffusion_pytorch_model.bin."""
    diffusers = need("diffusers", "the digits model")
    path = Path(weights) if weights else engines_dir() / "digits"
    if not (path / "unet" / "config.json").is_file():
        raise ModelNotFoundError(
            f"digits weights missing from {path}: re-clone the repository, or retrain with "
            f"`python -m fastdiff.models.train digits --out {path}`"
        )
    info = model_info(path)
    schedule = load_schedule(path / "scheduler")
    unet = load_model_component(path / "unet", diffusers.UNet2DModel, dtype, allow_pickle=allow_pickle)
    unet = unet.to(device)
    conditioner = student_conditioner(
        path, ClassConditioner(CLASS_NAMES, NULL_CLASS), unet, device=torch.device(device), dtype=dtype
    )
    return Engine(
        name="digits",
        unet=unet,
        conditioner=conditioner,
        decoder=PixelDecoder(1),
        schedule=schedule,
        sample_size=UNET_CONFIG["sample_size"],
        device=device,
        dtype=dtype,
        guidance_scale=info.get("default_guidance_scale", DEFAULT_GUIDANCE),
        plans_dir=path / "plans",
        **student_options(path),
        **engine_options,
    )


def calibration_prompts(count: int, seed: int = 0) -> list[str]:
    """The ten classes in turn (seed unused: the noise, not the prompt, is what varies)."""
    return [CLASS_NAMES[i % len(CLASS_NAMES)] for i in range(count)]
