"""Shared fixtures: diffusers (skipped cleanly when absent), small awkward latents, schedules."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before the
# kernels are defined (at import of fastdiff.ops.triton_step).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastdiff.schedules import DiscreteSchedule

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


@pytest.fixture(scope="session")
def diffusers():
    return pytest.importorskip("diffusers", reason="diffusers is needed for parity tests (pip install diffusers)")


@pytest.fixture
def sd_schedule() -> DiscreteSchedule:
    return DiscreteSchedule.from_config(SD_CONFIG)


def odd_latents(batch: int = 3, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """x_T with an awkward shape: batch 3, 3 channels, 5x7."""
    return torch.randn(batch, 3, 5, 7, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.fixture(scope="session")
def untrained_shapes_dir(tmp_path_factory):
    """A tiny-shapes pipeline directory with freshly initialised (untrained) weights."""
    pytest.importorskip("diffusers", reason="engines need diffusers")
    pytest.importorskip("transformers", reason="engines need transformers")
    from fastdiff.models import tiny_shapes

    out = tmp_path_factory.mktemp("untrained-shapes")
    components = tiny_shapes.build_components(out / "tokenizer", seed=0)
    components.vae.register_to_config(scaling_factor=0.7)
    tiny_shapes.save_pipeline(components, out, info={"default_guidance_scale": 3.0})
    return out
