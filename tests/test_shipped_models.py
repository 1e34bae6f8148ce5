"""Tests of the shipped weights: they are committed, so a model that does not load FAILS (it is
never skipped). Quality is measured by bench/; the thresholds here sit just under what was
measured at these settings (adherence 1.0 on 24 scenes, digits accuracy 1.0 on 50 images:
torch 2.13.0+cpu, 2-core Intel Xeon), so a real regression of one or two images fails."""

import json

import pytest
import torch

import fastdiff
from fastdiff.models.loading import engines_dir
from fastdiff.models.shapes_data import random_scenes


def _engine(name):
    pytest.importorskip("diffusers")
    try:
        return fastdiff.build_engine(name, device="cpu")
    except FileNotFoundError as exc:
        pytest.fail(f"the committed {name} engine did not load: {exc}")


def test_tiny_shapes_draws_what_it_is_told():
    from fastdiff.testing import shapes_score

    engine = _engine("tiny-shapes")
    prompts = [s.caption for s in random_scenes(24, torch.Generator().manual_seed(99))]
    out = engine.sample(prompts, steps=20, seed=0)
    assert shapes_score(out.images, prompts)["adherence"] >= 0.95  # measured 1.0: one miss of 24 passes


def test_tiny_shapes_loads_in_an_unmodified_diffusers_pipeline():
    diffusers = pytest.importorskip("diffusers")
    path = engines_dir() / "tiny-shapes"
    assert (path / "model_index.json").is_file(), f"the committed tiny-shapes is missing from {path}"
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_digits_draws_the_requested_digits():
    from fastdiff.testing import digits_accuracy

    engine = _engine("digits")
    labels = [d for d in range(10) for _ in range(5)]
    out = engine.sample([str(d) for d in labels], steps=20, seed=0)
    assert digits_accuracy(out.images, labels) >= 0.96  # measured 1.0: two misses of 50 pass


def test_engine_size_stays_small():
    total = sum(p.stat().st_size for p in engines_dir().rglob("*") if p.is_file())
    assert total < 30 * 2**20, f"engines/ holds {total / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", ["tiny-shapes", "digits"])
def test_shipped_olss_plans_are_calibrated_for_their_model(name):
    engine = _engine(name)
    assert engine.shipped_plans("olss") == [3, 4, 5, 6, 8, 10]
    for steps in engine.shipped_plans("olss"):
        plan = engine.plan_for("olss", steps)  # loads plans/olss-N.json and checks the schedule
        record = plan.metadata["calibration"]
        assert plan.nfe == steps and record["command"].startswith("fastdiff calibrate")
        assert record["teacher_hash"] and len(record["rows"]) == steps
    prompts = ["3", "7"] if name == "digits" else ["a red circle on a blue background"] * 2
    out = engine.sample(prompts, steps=5, sampler="olss", seed=0)
    assert out.nfe == [5] * len(out.prompts) and torch.isfinite(out.latents).all()


@pytest.mark.parametrize("name", ["tiny-shapes", "digits"])
def test_shipped_usf_plans_are_searched_for_their_model_and_the_default_picks_the_best(name):
    engine = _engine(name)
    assert engine.shipped_plans("usf") == [3, 4, 5, 6, 7, 8]
    for steps in engine.shipped_plans("usf"):
        plan = engine.plan_for("usf", steps)
        info = plan.metadata["search"]
        assert plan.nfe == steps and info["command"].startswith("fastdiff search")
        assert info["model_calls"] > 0 and info["evaluated"] > 30 and 0 < info["proxy_error"] < 1
    # the default sampler ("auto"): the shipped plan measured best on validation samples
    # (plans/auto.json, made by `fastdiff choose`, current for every shipped plan), else DPM-Solver++(2M)
    assert engine.sampler == "auto"
    choice = json.loads((engine.plans_dir / "auto.json").read_text())
    assert choice["command"].startswith(f"fastdiff choose --model {name}")
    counts = sorted(set(engine.shipped_plans("usf")) | set(engine.shipped_plans("olss")))
    assert sorted(map(int, choice["choices"])) == counts
    for n, c in choice["choices"].items():
        assert c["sampler"] == min(c["errors"], key=c["errors"].get)
        assert engine.resolve_sampler(None, int(n)) == c["sampler"]  # no entry is stale
    prompts = ["3", "7"] if name == "digits" else ["a red circle on a blue background"] * 2
    for steps in (5, 10, 20):
        solver = choice["choices"][str(steps)]["sampler"] if str(steps) in choice["choices"] else "dpmpp_2m"
        assert engine.resolve_sampler("auto", steps) == solver
        out = engine.sample(prompts, steps=steps, seed=0)
        assert out.plan.metadata["solver"] == solver and out.plan.nfe == steps
    assert out.plan.hash() == engine.plan_for("dpmpp_2m", 20).hash()
    with pytest.raises(ValueError, match=f"ships no usf plan for 20 steps.*fastdiff search --model {name} --nfe 20"):
        engine.sample(prompts, steps=20, sampler="usf")
