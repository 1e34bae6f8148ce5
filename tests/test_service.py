"""The C++ service example (csrc/examples/service.cpp) on the AOTI package of tiny-shapes: its
latents match the Python engine's for the same noise and embeddings, its PNGs are the decoded
images, and bad packages, plans and arguments fail with messages that name the problem.

`make test` builds both first (test-cpp: the package with `fastdiff export --format aoti`, the
binary with CMake against the installed torch); FASTDIFF_SERVICE and FASTDIFF_AOTI_PACKAGE
point elsewhere."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SERVICE = Path(os.environ.get("FASTDIFF_SERVICE", ROOT / "build/cmake/fastdiff_service"))
PACKAGE = Path(os.environ.get("FASTDIFF_AOTI_PACKAGE", ROOT / "build/aoti/tiny-shapes"))

pytestmark = pytest.mark.skipif(
    not (SERVICE.is_file() and (PACKAGE / "package.json").is_file()),
    reason=f"the service binary ({SERVICE}) or the AOTI package ({PACKAGE}) is not built: run `make test-cpp`",
)


def serve(*args, check=True):
    proc = subprocess.run([str(SERVICE), *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"service failed ({proc.returncode}): {proc.stderr}")
    return proc


def test_service_matches_the_python_engine(tmp_path):
    pytest.importorskip("diffusers", reason="the reference engine needs diffusers")
    from safetensors.torch import load_file, save_file

    import fastdiff
    from fastdiff.denoisers import GuidedDenoiser
    from fastdiff.engines.components import to_pil
    from fastdiff.loops import reference
    from fastdiff.program import load

    manifest = json.loads((PACKAGE / "package.json").read_text())
    requests, batch = 3, 2
    x_T = torch.randn(requests * batch, *manifest["latent_shape"], generator=torch.Generator().manual_seed(7))
    save_file({"x_T": x_T}, str(tmp_path / "noise.safetensors"))
    out = tmp_path / "out"
    proc = serve(
        PACKAGE,
        "--out",
        out,
        "--requests",
        requests,
        "--threads",
        3,
        "--batch",
        batch,
        "--noise",
        tmp_path / "noise.safetensors",
        "--save-latents",
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 0 and summary["requests"] == requests

    engine = fastdiff.build_engine("tiny-shapes", device="cpu")
    compiled = load(PACKAGE / "plan.json")  # the program the package carries, verified
    prompts = load_file(str(PACKAGE / "prompts.safetensors"))
    scale = manifest["prompts"]["guidance_scale"]
    for r in range(requests):
        cond = prompts["cond"][r % len(prompts["cond"])].expand(batch, -1, -1)
        uncond = prompts["uncond"].expand(batch, -1, -1)
        den = GuidedDenoiser(engine.unet, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, scale)
        xs = x_T[r * batch : (r + 1) * batch]
        want = reference.run(compiled, den, xs, guidance=den.guidance).latents
        got = load_file(str(out / f"request-{r}.safetensors"))["latents"]
        err = float((got - want).abs().max() / want.abs().max())
        assert err <= 1e-4, f"request {r}: C++ service vs Python engine {err:.2e} relative"
        from PIL import Image

        for b, image in enumerate(to_pil(engine.decoder(want))):
            png = Image.open(out / f"request-{r}-{b}.png").convert("RGB")
            assert png.size == image.size == (32, 32)
            diff = np.asarray(png, dtype=np.int16) - np.asarray(image, dtype=np.int16)
            assert int(np.abs(diff).max()) <= 2  # 8-bit rounding of nearly equal decodes


def _package_copy(tmp_path) -> Path:
    copy = tmp_path / "package"
    shutil.copytree(PACKAGE, copy)
    return copy


def test_package_from_another_torch_is_refused(tmp_path):
    pkg = _package_copy(tmp_path)
    manifest = json.loads((pkg / "package.json").read_text())
    manifest["torch"] = "2.0.0"
    (pkg / "package.json").write_text(json.dumps(manifest))
    proc = serve(pkg, "--out", tmp_path / "out", "--requests", 1, check=False)
    assert proc.returncode == 1
    assert "built by torch 2.0.0 but this runtime uses torch" in proc.stderr
    assert f"torch {torch.__version__.split('+')[0]}" in proc.stderr


def test_corrupt_package_and_bad_files(tmp_path):
    pkg = _package_copy(tmp_path)
    data = (pkg / "unet.pt2").read_bytes()
    (pkg / "unet.pt2").write_bytes(data[: len(data) // 3])
    proc = serve(pkg, "--out", tmp_path / "out", "--requests", 1, check=False)
    assert proc.returncode == 1 and "unet.pt2' is damaged or was replaced: its SHA-256 is" in proc.stderr
    (pkg / "package.json").write_text("{not json")
    proc = serve(pkg, "--out", tmp_path / "out", "--requests", 1, check=False)
    assert proc.returncode == 1 and "package.json' is not valid JSON" in proc.stderr


def test_plan_for_another_schedule_is_refused(tmp_path):
    from fastdiff import program, solvers
    from fastdiff.schedules import PRESETS, DiscreteSchedule

    manifest = json.loads((PACKAGE / "package.json").read_text())
    other = DiscreteSchedule.from_config(
        {**PRESETS["sd21"], "beta_end": 0.02, "prediction_type": manifest["prediction_type"]}
    )
    assert other.fingerprint != manifest["schedule_fingerprint"]
    program.save(program.compile(solvers.build("ddim", other, 4)), tmp_path / "plan.json")
    proc = serve(PACKAGE, "--out", tmp_path / "out", "--plan", tmp_path / "plan.json", "--requests", 1, check=False)
    assert proc.returncode == 1 and "plan fingerprint does not match the engine" in proc.stderr


def test_bad_arguments_and_noise(tmp_path):
    from safetensors.torch import save_file

    proc = serve(PACKAGE, "--requests", "0", "--out", tmp_path, check=False)
    assert proc.returncode == 2 and "--requests, --threads and --batch must be >= 1" in proc.stderr
    proc = serve(PACKAGE, "--out", tmp_path, "--frobnicate", check=False)
    assert proc.returncode == 2 and "unknown option --frobnicate" in proc.stderr and "usage:" in proc.stderr
    save_file({"x_T": torch.zeros(3)}, str(tmp_path / "noise.safetensors"))
    proc = serve(PACKAGE, "--out", tmp_path, "--noise", tmp_path / "noise.safetensors", "--requests", 2, check=False)
    assert proc.returncode == 1 and "'x_T' holds 3 values, expected 512" in proc.stderr
    assert "--skip-delta" in serve("--help").stdout
