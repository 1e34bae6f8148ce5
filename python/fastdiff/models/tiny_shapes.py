"""tiny-shapes: a small text-to-image latent diffusion model in diffusers' Stable Diffusion layout.

32x32 RGB images of one coloured shape on a plain background, an AutoencoderKL with a factor-4
latent (8x8x4), a UNet2DConditionModel with cross-attention, a 2-layer CLIP text
encoder with a word-level CLIP BPE tokenizer, and SD 2.1's noise schedule with v-prediction.
Components are built by diffusers/transformers, so ``StableDiffusionPipeline.from_pretrained(<dir>)``
loads the result; ``load_engine`` puts the shipped weights behind an Engine. Training lives in
fastdiff.models.training.tiny_shapes (``python -m fastdiff.models.train tiny-shapes``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engines.engine import Engine
from ..schedules import PRESETS
from .loading import ModelNotFoundError, engines_dir, pipeline_engine
from .shapes_data import COLORS, POSITIONS, SHAPES, random_scenes
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


def load_engine(
    weights=None, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False, **engine_options
) -> Engine:
    """tiny-shapes from engines/tiny-shapes, or from weights (a directory that save_pipeline wrote);
    engine_options (sampler, backend, ...) go to the Engine. allow_pickle: also load pickle
    weights (*.bin) where no safetensors file is (fastdiff.models.loading)."""
    path = Path(weights) if weights else engines_dir() / "tiny-shapes"
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"tiny-shapes weights missing from {path}: re-clone the repository, or retrain with "
            f"`python -m fastdiff.models.train tiny-shapes --out {path}`"
        )
    return pipeline_engine(
        path, name="tiny-shapes", device=device, dtype=dtype, allow_pickle=allow_pickle, **engine_options
    )


def calibration_prompts(count: int, seed: int = 0) -> list[str]:
    """Random captions from the grammar (seed-dependent: the benchmarks hold out other seeds)."""
    return [scene.caption for scene in random_scenes(count, torch.Generator().manual_seed(seed))]
