"""PlanScheduler: a StepPlan inside an unmodified diffusers pipeline."""

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def pipe(untrained_shapes_dir):
    diffusers = pytest.importorskip("diffusers")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(untrained_shapes_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler, steps", [("dpmpp_2m", 6), ("unipc_bh2_3", 5), ("pndm", 4)])
def test_pipeline_with_plan_scheduler_gives_the_engines_image(pipe, sampler, steps):
    from fastdiff.diffusers import PlanScheduler
    from fastdiff.engines import Engine

    engine = Engine.from_pipeline(pipe)
    plan = engine.plan_for(sampler, steps)
    prompt = ["a red circle on a blue background", "a green square on a white background"]
    ours = engine.sample(prompt, plan=plan, guidance_scale=3.0, seed=11)

    original = pipe.scheduler
    pipe.scheduler = PlanScheduler.from_plan(plan)
    try:
        call = dict(num_inference_steps=plan.nfe, guidance_scale=3.0)
        theirs = pipe(prompt, generator=torch.Generator().manual_seed(11), output_type="latent", **call).images
        images = pipe(prompt, generator=torch.Generator().manual_seed(11), **call).images
        with pytest.raises(ValueError, match="PlanScheduler, which holds a plan but not the model's noise schedule"):
            Engine.from_pipeline(pipe)
    finally:
        pipe.scheduler = original
    assert torch.allclose(theirs, ours.latents, rtol=0, atol=1e-6)
    for a, b in zip(images, ours.images):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_wrong_step_count_is_refused(pipe):
    from fastdiff.diffusers import PlanScheduler
    from fastdiff.engines import Engine

    scheduler = PlanScheduler.from_plan(Engine.from_pipeline(pipe).plan_for("ddim", 4))
    with pytest.raises(ValueError, match="runs a 4-call plan: pass num_inference_steps=4"):
        scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timesteps cannot be set"):
        scheduler.set_timesteps(timesteps=[999, 500])


def test_scheduler_config_round_trips_the_plan(pipe, tmp_path):
    from fastdiff.diffusers import PlanScheduler
    from fastdiff.engines import Engine

    plan = Engine.from_pipeline(pipe).plan_for("deis_3", 7)
    PlanScheduler.from_plan(plan).save_pretrained(tmp_path)
    loaded = PlanScheduler.from_pretrained(tmp_path)
    assert loaded.plan == plan and loaded.init_noise_sigma == plan.coef[0, 0]
    assert loaded.timesteps.tolist() == [float(t) for t in plan.times]


def test_a_stochastic_plan_draws_its_noise_from_the_pipelines_generator(pipe):
    from fastdiff.diffusers import PlanScheduler
    from fastdiff.distill.progressive import stochastic_plan
    from fastdiff.engines import Engine

    engine = Engine.from_pipeline(pipe)
    plan = stochastic_plan(engine, 4)
    prompt = ["a red circle on a blue background", "a green square on a white background"]
    ours = engine.sample(prompt, plan=plan, guidance_scale=3.0, seed=5)
    other = engine.sample(prompt, plan=plan, guidance_scale=3.0, seed=6)
    original = pipe.scheduler
    pipe.scheduler = PlanScheduler.from_plan(plan)
    try:
        call = dict(num_inference_steps=4, guidance_scale=3.0, output_type="latent")
        theirs = pipe(prompt, generator=torch.Generator().manual_seed(5), **call).images
    finally:
        pipe.scheduler = original
    assert torch.allclose(theirs, ours.latents, rtol=0, atol=1e-6)
    assert not torch.allclose(ours.latents, other.latents, atol=1e-3)  # the noise does depend on the seed
