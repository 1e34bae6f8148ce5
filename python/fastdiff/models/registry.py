"""The named models: a name -> loader table, build_engine over it (or over a diffusers model
directory), and each model's default calibration prompts.

Each model module owns its ``load_engine(weights, *, device, dtype, **engine_options)``; the
shared loading code is fastdiff.models.loading. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..engines.engine import Engine
from . import digits, sd21, tiny_shapes
from .loading import ModelNotFoundError, default_device, default_dtype, pipeline_engine

MODELS = {"tiny-shapes": tiny_shapes.load_engine, "digits": digits.load_engine, "sd21": sd21.load_engine}
KNOWN_MODELS = tuple(MODELS)
CALIBRATION_PROMPTS = {"tiny-shapes": tiny_shapes.calibration_prompts, "digits": digits.calibration_prompts}


def build_engine(
    model: str | os.PathLike,
    *,
    device=None,
    dtype=None,
    backend: str = "auto",
    sampler: str = "auto",
    weights: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    **engine_options,
) -> Engine:
    """An Engine for a named model or a diffusers Stable Diffusion directory.

    model: "tiny-shapes", "digits", "sd21", or a path. weights: for sd21, a diffusers directory
    with the real weights, or "random" for the exact architecture with random weights (speed
    benchmarks only; the outputs say so); for the shipped models, a directory in their layout.
    device defaults to CUDA when available, dtype to float16 on CUDA and float32 on CPU. backend:
    "auto" (compiled + CUDA graphs on a GPU, eager on the CPU), "eager", "cuda_graph" or
    "compiled"; `fastdiff info` says which are available. engine_options go to the Engine as given,
    e.g. loop="auto" | "reference" | "graph" | "cpp" (`fastdiff.loops`). sampler: the default of
    engine.sample; "auto" is the best plan the model ships for the step count (a searched "usf"
    plan, else "olss", else DPM-Solver++(2M)).

    Model directories are loaded strictly: a damaged or inconsistent one raises ModelLoadError
    naming the file and what is wrong (never a silently random weight). Weights load from
    safetensors files only; allow_pickle=True also loads pickle weights (*.bin, *.pt, *.ckpt) where
    no safetensors file is: loading a pickle file can run arbitrary code, so pass it only for files
    you trust.
    """
    device = default_device(device)
    dtype = default_dtype(dtype, device)
    engine_options = {"backend": backend, "sampler": sampler, **engine_options}
    name = os.fspath(model)
    if name in MODELS:
        return MODELS[name](weights, device=device, dtype=dtype, allow_pickle=allow_pickle, **engine_options)
    path = Path(name)
    if path.is_dir():
        return pipeline_engine(
            path, name=path.name, device=device, dtype=dtype, allow_pickle=allow_pickle, **engine_options
        )
    raise ModelNotFoundError(
        f"unknown model {name!r}: expected one of {', '.join(KNOWN_MODELS)} or a diffusers model directory"
    )


def calibration_prompts(model_name: str, count: int, seed: int = 0) -> list[str]:
    """A model's default calibration set (tiny-shapes: random captions from its grammar; digits:
    the classes in turn). Other models need prompts from the user."""
    if count < 1:
        raise ValueError(f"the calibration set needs at least 1 sample, got {count}")
    if model_name not in CALIBRATION_PROMPTS:
        raise ValueError(
            f"no default calibration prompts for {model_name!r}: give a prompts file (one prompt per line)"
        )
    return CALIBRATION_PROMPTS[model_name](count, seed)
