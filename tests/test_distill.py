"""Guided distillation, stage 1: the student starts as the teacher, learns the guided output, is a
model directory that fastdiff and diffusers load, and its training resumes identically; bad
input (other settings, a non-finite loss, w out of range, negative prompts) is refused clearly."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

import fastdiff  # noqa: E402
from fastdiff.distill import DistillError, distill_guided, make_student  # noqa: E402
from fastdiff.distill.data import DigitsData  # noqa: E402
from fastdiff.engines.components import GuidanceConditioner, guidance_features  # noqa: E402

TINY = {"batch": 8, "lr": 1e-3, "checkpoint_every": 2, "progress": False}


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return fastdiff.build_engine("digits", device="cpu")


def test_guidance_features_are_diffusers_w_embedding():
    from diffusers import StableDiffusionPipeline

    w = torch.tensor([1.0, 2.5, 7.5])
    ours = guidance_features(w, 256)
    theirs = StableDiffusionPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=256)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert guidance_features(w, 7).shape == (3, 7)


def test_student_starts_as_the_teachers_conditional_model(digits):
    student = make_student(digits.unet)
    z = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5.0, 500.0, 990.0])
    cond = digits.conditioner.encode(["1", "4", "9"], "cpu", torch.float32)
    with torch.no_grad():
        teacher = digits.unet(z, t, **cond).sample
        for w in (1.0, 3.0):
            torch.testing.assert_close(student(z, t, cond, torch.full((3,), w)), teacher, rtol=1e-5, atol=1e-5)
    # the teacher is untouched, and a student is not a teacher again
    assert digits.unet.config.class_embed_type is None and student.unet.config.class_embed_type == "identity"


def test_text_student_takes_w_as_diffusers_time_cond(tmp_path):
    engine = fastdiff.build_engine("tiny-shapes", device="cpu")
    student = make_student(engine.unet)
    assert student.unet.config.time_cond_proj_dim == 256 and student.embedding is None
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100.0, 700.0])
    cond = engine.conditioner.encode(["a red circle on a blue background"] * 2, "cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            student(z, t, cond, torch.tensor([2.0, 5.0])), engine.unet(z, t, **cond).sample, rtol=1e-5, atol=1e-5
        )
    with pytest.raises(DistillError, match="already takes a guidance input"):
        make_student(student.unet)


def test_training_lowers_the_error_to_the_guided_teacher(digits, tmp_path):
    from fastdiff.denoisers import GuidedOutput

    data = DigitsData()
    g = torch.Generator().manual_seed(123)
    x0, prompts = data.sample(32, g)
    t = torch.randint(100, 900, (32,), generator=g).float()
    z = 0.7 * x0 + 0.7 * torch.randn(x0.shape, generator=g)
    w = torch.full((32,), 4.0)
    cond = digits.conditioner.encode(prompts, "cpu", torch.float32)
    with torch.no_grad():
        target = GuidedOutput(digits.denoiser(prompts, guidance_scale=w))(z, t)

    def error(student):
        with torch.no_grad():
            return float(((student(z, t, cond, w) - target) ** 2).mean())

    before = error(make_student(digits.unet))
    result = distill_guided(digits, tmp_path / "s", steps=40, **{**TINY, "batch": 32})
    after = error(result.student)
    assert after < 0.7 * before, (before, after)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "s/run/log.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(v == v for v in losses)


def test_a_killed_run_resumes_to_the_same_student(digits, tmp_path):
    whole = distill_guided(digits, tmp_path / "a", steps=6, **TINY)
    part = distill_guided(digits, tmp_path / "b", steps=6, stop_after=3, **TINY)
    assert part.info["stopped"] == 3 and not (tmp_path / "b" / "unet").exists()
    resumed = distill_guided(digits, tmp_path / "b", steps=6, **TINY)
    for (name, a), (_, b) in zip(whole.student.state_dict().items(), resumed.student.state_dict().items()):
        assert torch.equal(a, b), name
    assert (tmp_path / "b" / "run" / "done.json").is_file()
    # another setting in the same directory is refused, naming it; nothing there changes
    before = (tmp_path / "b" / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(DistillError, match=r"other settings \(lr, w_range differ\)"):
        distill_guided(digits, tmp_path / "b", steps=6, **{**TINY, "lr": 2e-3}, w_range=(1, 3))
    assert (tmp_path / "b" / "run" / "checkpoint.pt").read_bytes() == before


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(digits, tmp_path):
    class Poisoned(DigitsData):
        calls = 0

        def sample(self, batch, generator):
            x0, prompts = super().sample(batch, generator)
            Poisoned.calls += 1
            return (x0 * float("nan") if Poisoned.calls == 4 else x0), prompts

    with pytest.raises(DistillError, match=r"loss is nan at step 4 of 6; stopped. The last checkpoint is kept"):
        distill_guided(digits, tmp_path / "n", steps=6, data=Poisoned(), **TINY)
    state = torch.load(tmp_path / "n" / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2


def test_bad_settings(digits, tmp_path):
    with pytest.raises(ValueError, match="w_range must be"):
        distill_guided(digits, tmp_path, steps=2, w_range=(0.5, 3), **TINY)
    with pytest.raises(ValueError, match="steps must be"):
        distill_guided(digits, tmp_path, steps=0, **TINY)
    corrupt = tmp_path / "c" / "run"
    corrupt.mkdir(parents=True)
    (corrupt / "settings.json").write_text("{not json")
    with pytest.raises(DistillError, match="settings.json is corrupt"):
        distill_guided(digits, tmp_path / "c", steps=2, **TINY)


@pytest.fixture(scope="module")
def student_dir(digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("student")
    distill_guided(digits, out, steps=2, w_range=(1.0, 4.0), **TINY)
    return out


def test_the_student_directory_samples_with_one_call_per_step(student_dir):
    import diffusers

    engine = fastdiff.build_engine("digits", device="cpu", weights=student_dir)
    assert isinstance(engine.conditioner, GuidanceConditioner) and engine.conditioner.w_range == (1.0, 4.0)
    calls = []
    inner = engine.unet.forward
    engine.unet.forward = lambda x, *a, **k: (calls.append(x.shape[0]), inner(x, *a, **k))[1]
    out = engine.sample(["3", "7", "1"], steps=4, sampler="ddim", guidance_scale=3.0, seed=0)
    assert out.unet_calls == 4 and calls == [3, 3, 3, 3]  # the batch is not doubled: no unconditional pass
    a = engine.sample("3", steps=4, sampler="ddim", guidance_scale=1.5, seed=0).latents
    b = engine.sample("3", steps=4, sampler="ddim", guidance_scale=3.5, seed=0).latents
    assert not torch.equal(a, b)  # w is a sampling argument the student sees
    with pytest.warns(RuntimeWarning, match=r"outside the range this student was distilled on \(\[1, 4\]\)"):
        engine.sample("3", steps=2, sampler="ddim", guidance_scale=6.0, seed=0)
    with pytest.raises(ValueError, match="takes no negative prompt"):
        engine.sample("3", steps=2, negative_prompt="8")
    # the UNet is a plain diffusers UNet2DModel directory
    unet = diffusers.UNet2DModel.from_pretrained(student_dir / "unet")
    assert unet.config.class_embed_type == "identity"


def test_an_incomplete_student_directory_is_refused(student_dir, tmp_path):
    import shutil

    from fastdiff.models.loading import ModelNotFoundError

    broken = tmp_path / "broken"
    shutil.copytree(student_dir, broken)
    shutil.rmtree(broken / "guidance_embedding")
    with pytest.raises(ModelNotFoundError, match="lacks its guidance embedding"):
        fastdiff.build_engine("digits", device="cpu", weights=broken)
    info = json.loads((broken / "fastdiff.json").read_text())
    del info["student"]
    (broken / "fastdiff.json").write_text(json.dumps(info))
    with pytest.raises(ModelNotFoundError, match="has no 'student' section"):
        fastdiff.build_engine("digits", device="cpu", weights=broken)


def test_text_student_loads_in_an_unmodified_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from fastdiff.distill import save_student
    from fastdiff.models.loading import engines_dir

    engine = fastdiff.build_engine("tiny-shapes", device="cpu")
    student = make_student(engine.unet)
    with torch.no_grad():  # as if trained: w now matters
        student.unet.time_embedding.cond_proj.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    out = save_student(student, tmp_path / "ts", teacher_dir=engines_dir() / "tiny-shapes", info={"w_range": [1, 5]})
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    inner = pipe.unet.forward
    pipe.unet.forward = lambda x, *a, **k: (
        calls.append((x.shape[0], k.get("timestep_cond") is not None)),
        inner(x, *a, **k),
    )[1]
    prompt = "a red circle on a blue background"
    theirs = pipe(prompt, num_inference_steps=3, guidance_scale=3.0, output_type="pt", generator=torch.manual_seed(0))
    assert calls == [(1, True)] * 3  # one call per step, w embedded: no classifier-free guidance batch
    ours = fastdiff.build_engine("tiny-shapes", device="cpu", weights=out)
    assert isinstance(ours.conditioner, GuidanceConditioner) and ours.conditioner.keys[-1] == "timestep_cond"
    img = ours.sample(prompt, steps=3, sampler="ddim", guidance_scale=3.0, seed=0)
    assert img.unet_calls == 3 and theirs.images.shape[0] == 1


def test_training_data_of_each_shipped_model():
    from fastdiff.distill.data import ShapesData, for_engine

    shapes = fastdiff.build_engine("tiny-shapes", device="cpu")
    data = ShapesData(shapes.decoder.vae, size=6, seed=1)
    x0, prompts = data.sample(4, torch.Generator().manual_seed(0))
    assert x0.shape == shapes.initial_noise(4, seed=0).shape and len(prompts) == 4
    assert all(p.startswith(("a ", "an ")) and "background" in p for p in prompts)
    assert 0.3 < float(x0.std()) < 3  # scaled like the latents the UNet was trained on
    with pytest.raises(DistillError, match="no distillation data for the model 'sd21'"):
        for_engine(type("E", (), {"name": "sd21"})())


# ---------------------------------------------------------------- stage 2: progressive distillation
def test_ddim_steps_of_the_trainer_are_the_engines_ddim_plan(student_dir):
    from fastdiff.distill.progressive import ddim_grid, ddim_step, two_step_target
    from fastdiff.distill.student import load_student
    from fastdiff.schedules import data_prediction

    engine = fastdiff.build_engine("digits", device="cpu", weights=student_dir)
    student, _ = load_student(student_dir)
    prompts, w = ["3", "8", "0"], torch.full((3,), 2.5)
    out = engine.sample(prompts, steps=4, sampler="ddim", guidance_scale=2.5, seed=5)
    grid = ddim_grid(engine, 4)
    cond = engine.conditioner.base.encode(prompts, "cpu", torch.float32)
    z = engine.initial_noise(3, seed=5)
    with torch.no_grad():
        for k in range(4):
            x0 = data_prediction(
                student(z, grid.times[k].expand(3), cond, w), z, grid.alpha[k], grid.sigma[k], "v_prediction"
            )
            z = ddim_step(
                z,
                x0,
                grid.alpha[k].expand(3),
                grid.sigma[k].expand(3),
                grid.alpha[k + 1].expand(3),
                grid.sigma[k + 1].expand(3),
            )
    torch.testing.assert_close(z, out.latents, rtol=1e-4, atol=1e-4)
    # x̃ takes the 2-step student from z_t to where the teacher's two steps go, in one DDIM step
    teacher_grid, half = ddim_grid(engine, 4), ddim_grid(engine, 2)
    z0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    k = torch.tensor([0, 1, 1])
    with torch.no_grad():
        target = two_step_target(student, z0, 2 * k, teacher_grid, cond, w, "v_prediction")
        z2 = z0
        for j in (0, 1):
            idx = 2 * k + j
            x0 = data_prediction(
                student(z2, teacher_grid.times[idx], cond, w),
                z2,
                teacher_grid.alpha[idx].view(-1, 1, 1, 1),
                teacher_grid.sigma[idx].view(-1, 1, 1, 1),
                "v_prediction",
            )
            z2 = ddim_step(
                z2,
                x0,
                teacher_grid.alpha[idx],
                teacher_grid.sigma[idx],
                teacher_grid.alpha[idx + 1],
                teacher_grid.sigma[idx + 1],
            )
    one = ddim_step(z0, target, half.alpha[k], half.sigma[k], half.alpha[k + 1], half.sigma[k + 1])
    torch.testing.assert_close(one, z2, rtol=1e-4, atol=1e-4)
    # the stochastic sampler's times: odd teacher times step twice too; the last one steps once
    # (to the end point), so its target is the teacher's own x̂ there
    i = torch.tensor([1, 3, 2])
    with torch.no_grad():
        target = two_step_target(student, z0, i, teacher_grid, cond, w, "v_prediction")
        a, s = teacher_grid.alpha, teacher_grid.sigma
        x0 = data_prediction(
            student(z0, teacher_grid.times[i], cond, w),
            z0,
            a[i].view(-1, 1, 1, 1),
            s[i].view(-1, 1, 1, 1),
            "v_prediction",
        )
        z1 = ddim_step(z0, x0, a[i], s[i], a[i + 1], s[i + 1])
        x1 = data_prediction(student(z1, teacher_grid.times[2], cond, w), z1, a[2], s[2], "v_prediction")
        z2 = ddim_step(z1, x1, a[2].expand(3), s[2].expand(3), a[3].expand(3), s[3].expand(3))
    torch.testing.assert_close(target[1], x0[1], rtol=1e-5, atol=1e-5)
    end = torch.tensor([3, 4, 4])
    one = ddim_step(z0, target, a[i], s[i], a[end], s[end])
    torch.testing.assert_close(one[0], z2[0], rtol=1e-4, atol=1e-4)


PROG = {"start_steps": 4, "end_steps": 1, "steps_per_round": 3, "batch": 8, "checkpoint_every": 1, "progress": False}


def test_progressive_chain_resumes_and_its_students_sample_with_their_plans(student_dir, tmp_path):
    from fastdiff.distill.progressive import distill_progressive, student_chain

    engine = fastdiff.build_engine("digits", device="cpu", weights=student_dir)
    whole = distill_progressive(engine, tmp_path / "a", **PROG)
    assert [d.name for d in whole] == ["steps-2", "steps-1"] and set(student_chain(tmp_path / "a")) == {1, 2}
    part = distill_progressive(engine, tmp_path / "b", stop_after=(1, 2), **PROG)
    assert [d.name for d in part] == ["steps-2"] and not (tmp_path / "b" / "steps-1" / "unet").exists()
    stamp = (tmp_path / "b" / "steps-2" / "run" / "checkpoint.pt").stat().st_mtime_ns
    resumed = distill_progressive(engine, tmp_path / "b", **PROG)
    assert [d.name for d in resumed] == ["steps-2", "steps-1"]
    assert (tmp_path / "b" / "steps-2" / "run" / "checkpoint.pt").stat().st_mtime_ns == stamp  # not retrained
    from safetensors.torch import load_file

    for part_name in ("unet/diffusion_pytorch_model.safetensors", "guidance_embedding/model.safetensors"):
        a, b = (load_file(tmp_path / r / "steps-1" / part_name) for r in ("a", "b"))
        assert all(torch.equal(a[key], b[key]) for key in a), part_name
    two = fastdiff.build_engine("digits", device="cpu", weights=tmp_path / "a" / "steps-2")
    out = two.sample(["4", "2"], steps=2, guidance_scale=3.0, seed=0)
    assert out.plan.metadata["distilled"]["steps"] == 2 and out.unet_calls == 2
    with pytest.raises(ValueError, match=r"distilled to sample with 2 DDIM steps at times \[999, 499\]"):
        two.sample("4", steps=8)
    with pytest.raises(ValueError, match="another schedule"):
        two.sample("4", steps=2, sampler="dpmpp_2m_karras")
    # the paper's stochastic sampler on twice the steps: shipped with the round, fresh noise per
    # seed, reproducible for a seed, and refused with the skip gate or the C++ loop
    assert two.shipped_plans("distilled_stochastic") == [4] and two.shipped_plans("distilled") == [2]
    sto = two.sample(["4", "2"], steps=4, sampler="distilled_stochastic", guidance_scale=3.0, seed=0)
    assert sto.plan.stochastic and sto.unet_calls == 4 and two.resolve_sampler("auto", 4) == "distilled_stochastic"
    again = two.sample(["4", "2"], steps=4, guidance_scale=3.0, seed=0)
    other = two.sample(["4", "2"], steps=4, guidance_scale=3.0, seed=1)
    assert torch.equal(sto.latents, again.latents) and not torch.allclose(sto.latents, other.latents)
    with pytest.raises(ValueError, match="or steps=4 with sampler 'distilled_stochastic'"):
        two.sample("4", steps=3, sampler="ddim")
    with pytest.raises(ValueError, match="skip gate cannot run a stochastic plan"):
        two.sample("4", steps=4, skip="adaptive")
    # shipped form: float16 weights, the plans and the run's logs, no checkpoint
    from fastdiff.distill import export_student

    shipped = export_student(tmp_path / "a" / "steps-2", tmp_path / "ship")
    assert not (shipped / "run" / "checkpoint.pt").exists() and (shipped / "run" / "log.jsonl").is_file()
    assert sorted(p.name for p in (shipped / "plans").iterdir()) == ["distilled-2.json", "distilled_stochastic-4.json"]
    small = fastdiff.build_engine("digits", device="cpu", weights=shipped).sample(
        ["4", "2"], steps=2, guidance_scale=3.0, seed=0
    )
    torch.testing.assert_close(small.latents, out.latents, rtol=0, atol=0.05)


def test_progressive_needs_a_guided_student(digits, tmp_path):
    from fastdiff.distill.progressive import distill_progressive

    with pytest.raises(DistillError, match="not a guidance-distilled student: run stage 1 first"):
        distill_progressive(digits, tmp_path, **PROG)
    with pytest.raises(ValueError, match="powers of two"):
        distill_progressive(fastdiff.build_engine("digits", device="cpu"), tmp_path, **{**PROG, "start_steps": 6})


def test_cli_distill_both_stages(tmp_path, capsys):
    from fastdiff.cli import main

    common = ["--model", "digits", "--device", "cpu", "--train-steps", "2", "--batch", "4", "--checkpoint-every", "1"]
    assert main(["distill", "--stage", "guided", "--out", str(tmp_path / "g"), *common, "--w-max", "3"]) == 0
    text = capsys.readouterr().out
    assert "guided student of digits (w in [1, 3])" in text and f"--weights {tmp_path / 'g'}" in text
    assert main(["distill", "--stage", "progressive", "--out", str(tmp_path / "p"), *common]) == 2
    assert "give its directory as --weights DIR" in capsys.readouterr().err
    argv = [
        "distill",
        "--stage",
        "progressive",
        "--out",
        str(tmp_path / "p"),
        *common,
        "--weights",
        str(tmp_path / "g"),
    ]
    assert main(argv + ["--start-steps", "2"]) == 0
    text = capsys.readouterr().out
    assert "1-step student (from 2)" in text and "--steps 1" in text
    # the same directory with other settings: a clear error, not a traceback
    assert main(argv + ["--start-steps", "2", "--lr", "0.01"]) == 2
    assert "other settings (lr differ)" in capsys.readouterr().err


def test_shipped_digits_students_sample_with_their_plans():
    from fastdiff.models.loading import engines_dir

    pytest.importorskip("sklearn")
    root = engines_dir() / "digits" / "students"
    guided = fastdiff.build_engine("digits", device="cpu", weights=root / "guided")
    assert guided.conditioner.embeds_guidance and guided.sample("3", steps=3, sampler="ddim", seed=0).unet_calls == 3
    for m in (16, 8, 4, 2, 1):
        engine = fastdiff.build_engine("digits", device="cpu", weights=root / f"steps-{m}")
        out = engine.sample(["3", "5"], steps=m, guidance_scale=2.0, seed=0)
        assert out.unet_calls == m and out.plan.metadata["distilled"]["steps"] == m and not out.plan.stochastic
        out = engine.sample(["3", "5"], steps=2 * m, guidance_scale=2.0, seed=0)
        assert out.unet_calls == 2 * m and out.plan.stochastic
        assert json.loads((root / f"steps-{m}" / "run" / "done.json").read_text())["loss"] < 0.01
