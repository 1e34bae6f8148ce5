"""The training scripts run end to end on tiny settings and write loadable models."""

import json
import subprocess
import sys

import pytest
import torch

import fastdiff


def run_train(*args):
    result = subprocess.run(
        [sys.executable, "-m", "fastdiff.models.train", *args, "--quiet"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


TINY_SETTING = ("--vae-steps", "2", "--unet-steps", "2", "--dataset-size", "32", "--batch", "8")


@pytest.fixture(scope="module")
def tiny_shapes_run(tmp_path_factory):
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("ts")
    info = run_train("tiny-shapes", "--out", str(out), *TINY_SETTING)
    return out, info


def test_tiny_shapes_training_writes_a_diffusers_pipeline(tiny_shapes_run):
    from diffusers import StableDiffusionPipeline

    out, info = tiny_shapes_run
    assert info["unet_steps"] == 2 and info["vae"]["scaling_factor"] > 0
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a blue background", num_inference_steps=2).images[0]
    assert image.size == (32, 32)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())


def test_tiny_shapes_training_is_reproducible_from_the_seed(tiny_shapes_run, tmp_path):
    from safetensors.torch import load_file

    out, _ = tiny_shapes_run
    run_train("tiny-shapes", "--out", str(tmp_path), *TINY_SETTING)
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        a, b = load_file(out / part), load_file(tmp_path / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_digits_training_writes_a_loadable_engine(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("sklearn")
    info = run_train("digits", "--out", str(tmp_path), "--unet-steps", "2", "--classifier-steps", "20")
    assert 0 <= info["classifier"]["heldout_accuracy"] <= 1
    engine = fastdiff.build_engine("digits", weights=tmp_path, device="cpu")
    out = engine.sample(["3", "digit 7"], steps=3, seed=0)
    assert [im.size for im in out.images] == [(8, 8), (8, 8)] and out.images[0].mode == "L"
    with pytest.raises(ValueError, match="names no class"):
        engine.sample("eleven", steps=2)
