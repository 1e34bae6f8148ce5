"""sd21: Stable Diffusion 2.1 (768, v-prediction).

Real weights: a local diffusers directory (weights=path) or the local Hugging Face cache; never
downloaded. weights="random": the exact architecture from engines/sd21/*/config.json with random
weights, for speed benchmarks only (the engine and its outputs are flagged).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..engines.components import TextConditioner, VaeDecoder
from ..engines.engine import Engine
from ..schedules import DiscreteSchedule
from .loading import ModelNotFoundError, engines_dir, load_sd_pipeline, need, sd21_local
from .tokenizer import clip_bpe, open_clip_bpe_path, write_tokenizer

GUIDANCE = 7.5

HOW_TO_PROVIDE = (
    "sd21 weights are not on this machine and fastdiff never downloads: pass "
    "weights='/path/to/stable-diffusion-2-1' (a diffusers directory with model_index.json), put the "
    "model in the local Hugging Face cache (e.g. `huggingface-cli download stabilityai/stable-diffusion-2-1` "
    "on a machine with internet, then copy ~/.cache/huggingface), or use weights='random' for speed "
    "benchmarks with the exact architecture"
)


def config_dir() -> Path:
    return engines_dir() / "sd21"


def _read(name: str) -> dict:
    path = config_dir() / name
    if not path.is_file():
        raise ModelNotFoundError(f"missing sd21 config {path}")
    return json.loads(path.read_text())


def clip_tokenizer():
    """SD 2.1's tokenizer: the real CLIP BPE (from open_clip's vocabulary file) with pad "!"."""
    transformers = need("transformers", "the sd21 tokenizer")
    bpe = open_clip_bpe_path()
    if bpe is None:
        raise ModelNotFoundError(
            "the CLIP BPE vocabulary for sd21's tokenizer comes from the open_clip package, which is not "
            "installed: pip install --no-deps open_clip_torch (only its vocabulary file is used)"
        )
    cache = Path(os.environ.get("FASTDIFF_CACHE", Path.home() / ".cache" / "fastdiff")) / "clip-bpe-sd21"
    if not (cache / "vocab.json").is_file():
        vocab, merges = clip_bpe(bpe)
        config = _read("tokenizer/tokenizer_config.json")
        write_tokenizer(
            cache, vocab, merges, model_max_length=config["model_max_length"], pad_token=config["pad_token"]
        )
    return transformers.CLIPTokenizer.from_pretrained(cache)


def _without_private(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_random_components(device, dtype):
    """(tokenizer, text_encoder, unet, vae) of SD 2.1 with random weights, created on device."""
    diffusers = need("diffusers", "sd21")
    transformers = need("transformers", "sd21")
    tokenizer = clip_tokenizer()
    text_config = {
        k: v for k, v in _read("text_encoder/config.json").items() if k not in ("architectures", "torch_dtype")
    }
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(**_without_private(_read("unet/config.json")))
        vae = diffusers.AutoencoderKL(**_without_private(_read("vae/config.json")))
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config))
    return tokenizer, text_encoder.to(dtype).eval(), unet.to(dtype).eval(), vae.to(dtype).eval()


def load_engine(
    weights=None, *, device: torch.device, dtype: torch.dtype, allow_pickle: bool = False, **engine_options
) -> Engine:
    """SD 2.1 from weights (a diffusers directory), else the local Hugging Face cache; weights="random"
    builds the architecture with random weights. engine_options (sampler, backend, ...) go to the Engine.
    allow_pickle: also load pickle weights (*.bin) where no safetensors file is (fastdiff.models.loading)."""
    if weights is None:
        weights = sd21_local()
        if weights is None:
            raise ModelNotFoundError(HOW_TO_PROVIDE)
    if isinstance(weights, str) and weights == "random":
        tokenizer, text_encoder, unet, vae = build_random_components(device, dtype)
        return Engine(
            name="sd21",
            unet=unet,
            conditioner=TextConditioner(tokenizer, text_encoder),
            decoder=VaeDecoder(vae),
            schedule=DiscreteSchedule.from_config(_read("scheduler/scheduler_config.json")),
            sample_size=unet.config.sample_size,
            device=device,
            dtype=dtype,
            guidance_scale=GUIDANCE,
            random_weights=True,
            **engine_options,
        )
    path = Path(weights)
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{path} is not a diffusers model directory (no model_index.json). {HOW_TO_PROVIDE}")
    pipe = load_sd_pipeline(path, device, dtype, allow_pickle=allow_pickle)
    return Engine.from_pipeline(pipe, name="sd21", guidance_scale=GUIDANCE, **engine_options)
