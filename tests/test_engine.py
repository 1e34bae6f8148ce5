"""The Engine API on an untrained tiny-shapes pipeline (fast; the trained model's quality is
measured by bench/, not here)."""

import pytest
import torch

import fastdiff
from fastdiff.engines import BackendUnavailableError, NonFiniteError
from fastdiff.models.loading import ModelNotFoundError


@pytest.fixture(scope="module")
def engine(untrained_shapes_dir):
    return fastdiff.build_engine(untrained_shapes_dir, device="cpu")


def test_sample_returns_images_latents_nfe_and_timings(engine):
    out = engine.sample("a red circle on a blue background", steps=5, seed=3)
    assert len(out.images) == 1 and out.images[0].size == (32, 32) and out.images[0].mode == "RGB"
    assert out.latents.shape == (1, 4, 8, 8)
    assert out.nfe == [5] * len(out.prompts) and out.unet_calls == 5 and out.plan.nfe == 5 and out.seed == 3
    assert set(out.timings) == {"encode", "denoise", "decode", "total"}
    assert out.timings["total"] >= out.timings["denoise"] > 0
    assert out.random_weights is False and out.notes == []


def test_same_seed_same_image_and_prompt_lists_batch(engine):
    a = engine.sample("a red circle on a blue background", steps=3, seed=7)
    b = engine.sample("a red circle on a blue background", steps=3, seed=7)
    assert torch.equal(a.latents, b.latents)
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    out = engine.sample(prompts, steps=3, seed=7, num_images=2)
    assert len(out.images) == 4 and out.prompts == [prompts[0], prompts[0], prompts[1], prompts[1]]


def test_guidance_is_one_call_on_the_doubled_batch(engine, monkeypatch):
    batches = []
    forward = engine.unet.forward

    def spy(sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(engine.unet, "forward", spy)
    engine.sample(["a red circle on a blue background"] * 3, steps=4, guidance_scale=5.0, seed=0)
    assert batches == [6] * 4
    batches.clear()
    engine.sample("a red circle on a blue background", steps=4, guidance_scale=1.0, seed=0)
    assert batches == [1] * 4


def test_plans_are_cached_per_sampler_and_steps(engine):
    assert engine.plan_for("dpmpp_2m", 6) is engine.plan_for("dpmpp_2m", 6)
    assert engine.plan_for("dpmpp_2m_karras", 6) is not engine.plan_for("dpmpp_2m", 6)
    out = engine.sample("a red circle on a blue background", steps=6, sampler="unipc_bh2", seed=0)
    assert out.plan is engine.plan_for("unipc_bh2", 6) and out.nfe == [6] * len(out.prompts)


def test_an_explicit_plan_overrides_sampler_and_steps(engine):
    plan = engine.plan_for("ddim", 4)
    out = engine.sample("a red circle on a blue background", steps=50, plan=plan, seed=0)
    assert out.nfe == [4] * len(out.prompts) and out.plan is plan


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"prompt": []}, ValueError, "empty list"),
        ({"steps": 0}, ValueError, "steps must be an integer >= 1"),
        ({"height": 30}, ValueError, "height=30 must be a positive multiple of 4"),
        ({"width": 0}, ValueError, "width=0 must be a positive multiple of 4"),
        ({"num_images": 0}, ValueError, "num_images must be an integer >= 1"),
        ({"sampler": "lms"}, ValueError, "unknown sampler 'lms'"),
        ({"negative_prompt": ["a", "b"]}, ValueError, "2 negative prompts for 1 prompts"),
        ({"skip": "always"}, ValueError, "skip must be None, 'adaptive' or a GateSpec"),
        ({"plan": "missing-plan.json"}, ValueError, "cannot open plan file 'missing-plan.json'"),
        ({"guidance_scale": [2.0, 3.0]}, ValueError, "2 guidance weights for 1 prompts"),
        ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be a finite number"),
        ({"latents": torch.zeros(2, 4, 8, 8)}, ValueError, r"latents have shape \(2, 4, 8, 8\), expected \(1, "),
        ({"latents": [0.0]}, TypeError, "latents must be a floating-point torch.Tensor"),
    ],
)
def test_bad_arguments_name_the_problem(engine, kwargs, error, message):
    kwargs = {"prompt": "a red circle on a blue background", "steps": 3, **kwargs}
    with pytest.raises(error, match=message):
        engine.sample(**kwargs)


def test_other_sizes_that_fit_the_autoencoder_work(engine):
    out = engine.sample("a red circle on a blue background", steps=2, height=48, width=24, seed=0)
    assert out.images[0].size == (24, 48)


def test_nan_outputs_are_detected_and_explained(engine, monkeypatch):
    forward = engine.unet.forward

    def broken(sample, *args, **kwargs):
        result = forward(sample, *args, **kwargs)
        return (result[0] * float("nan"),)

    monkeypatch.setattr(engine.unet, "forward", broken)
    with pytest.raises(NonFiniteError, match="NaN/inf latents"):
        engine.sample("a red circle on a blue background", steps=2, seed=0)


def test_nan_in_every_dtype_is_an_error_after_the_float16_fallback(untrained_shapes_dir, monkeypatch):
    engine = fastdiff.build_engine(untrained_shapes_dir, device="cpu", dtype="float16")
    forward = engine.unet.forward
    monkeypatch.setattr(engine.unet, "forward", lambda *a, **k: (forward(*a, **k)[0] * float("inf"),))
    with (
        pytest.warns(RuntimeWarning, match="unet overflowed in float16.*bfloat16"),
        pytest.raises(
            NonFiniteError, match=r"UNet in bfloat16\): the UNet's output was first non-finite at model call 0"
        ),
    ):
        engine.sample("a red circle on a blue background", steps=2, seed=0)


def test_unknown_models_list_the_known_ones():
    with pytest.raises(ModelNotFoundError, match="unknown model 'sd15': expected one of tiny-shapes, digits, sd21"):
        fastdiff.build_engine("sd15")


def test_missing_shipped_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDIFF_ENGINES", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="python -m fastdiff.models.train tiny-shapes"):
        fastdiff.build_engine("tiny-shapes", device="cpu")
    with pytest.raises(ModelNotFoundError, match="python -m fastdiff.models.train digits"):
        fastdiff.build_engine("digits", device="cpu")


def test_sd21_without_weights_explains_how_to_provide_them(monkeypatch):
    from fastdiff.models import sd21

    monkeypatch.setattr(sd21, "sd21_local", lambda: None)
    with pytest.raises(ModelNotFoundError, match="never downloads.*weights='random'"):
        fastdiff.build_engine("sd21", device="cpu")
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        fastdiff.build_engine("sd21", device="cpu", weights="/nonexistent")


def test_bad_dtype_and_backend_are_refused(untrained_shapes_dir):
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        fastdiff.build_engine(untrained_shapes_dir, device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="unknown backend 'fast': expected one of auto, eager, cuda_graph, compiled"):
        fastdiff.build_engine(untrained_shapes_dir, device="cpu", backend="fast")
    with pytest.raises(
        BackendUnavailableError, match="'tensorrt' is unavailable: the tensorrt package is not installed"
    ):
        fastdiff.build_engine(untrained_shapes_dir, device="cpu", backend="tensorrt")
    with pytest.raises(BackendUnavailableError, match="'cuda_graph' is unavailable: CUDA graphs need a CUDA device"):
        fastdiff.build_engine(untrained_shapes_dir, device="cpu", backend="cuda_graph")


def test_sample_is_the_engines_loop_on_the_plans_program(engine):
    from fastdiff.loops import reference
    from fastdiff.program import compile as compile_program

    prompts = ["a red circle on a blue background", "a green square", "two yellow triangles"]
    out = engine.sample(prompts, steps=6, seed=5, guidance_scale=2.5)
    assert engine.loop.name == "reference" and out.nfe == [6, 6, 6] and out.unet_calls == 6
    denoiser = engine.denoiser(prompts, guidance_scale=2.5)
    x_T = engine.initial_noise(3, seed=5)
    want = reference.run(compile_program(out.plan), denoiser, x_T, guidance=denoiser.guidance).latents
    assert torch.equal(out.latents, want)


def test_adaptive_skipping_reports_the_calls_made_per_image(engine, monkeypatch):
    from fastdiff.gate import GateSpec

    batches = []
    unet = engine.unet
    forward = unet.forward

    def counting(x, *args, **kwargs):
        batches.append(x.shape[0])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counting)
    prompts = ["a red circle on a blue background", "a green square", "two yellow triangles"]
    out = engine.sample(prompts, steps=20, seed=1, skip=GateSpec(delta=0.2, max_skips=3))
    assert len(out.nfe) == 3 and all(3 <= n <= 20 for n in out.nfe) and min(out.nfe) < 20
    assert out.unet_calls == len(batches) and sum(batches) == 2 * sum(out.nfe)  # guided: 2 rows per sample
    assert [20 - len(s) for s in out.skipped] == out.nfe
    again = engine.sample(prompts, steps=20, seed=1, skip=GateSpec(delta=0.2, max_skips=3))
    assert again.nfe == out.nfe and torch.equal(again.latents, out.latents)  # a fresh state per call
    assert engine.sample(prompts[0], steps=20, seed=1, skip="adaptive").nfe[0] <= 20
    with pytest.raises(ValueError, match="decides from model call 3 on .* this plan makes 3 calls, so nothing"):
        engine.sample(prompts[0], steps=3, skip="adaptive")
    with pytest.raises(ValueError, match="decides from model call 6 on .* this plan makes 5 calls"):
        engine.sample(prompts[0], steps=5, skip=GateSpec(warmup=6))
    assert engine.sample(prompts[0], steps=4, seed=1, skip="adaptive").nfe[0] <= 4  # call 3 may be skipped


def test_latents_and_per_prompt_guidance_are_what_a_batch_of_requests_needs(engine):
    prompts = ["a red circle on a blue background", "a green square on a white background"]
    a = engine.sample(prompts[0], steps=3, seed=1, guidance_scale=2.0)
    b = engine.sample(prompts[1], steps=3, seed=2, guidance_scale=4.0)
    x_T = torch.cat([engine.initial_noise(1, seed=1), engine.initial_noise(1, seed=2)])
    both = engine.sample(prompts, steps=3, latents=x_T, guidance_scale=[2.0, 4.0])
    torch.testing.assert_close(both.latents, torch.cat([a.latents, b.latents]), rtol=1e-4, atol=1e-4)
    request = engine.prepare(prompts, 3, guidance_scale=[2.0, 4.0], num_images=2, seed=5)
    assert request.prompts == [prompts[0]] * 2 + [prompts[1]] * 2 and request.guidance.tolist() == [2, 2, 4, 4]
    assert request.plan.num_calls == 3 and request.seed == 5
