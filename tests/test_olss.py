"""OLSS calibration on the exact Gaussian-mixture model: least squares from Gram statistics,
ridge by cross-validation, path planning, open/closed loop fits, resumable trajectories and
the errors for bad input."""

import numpy as np
import pytest
import torch

from fastdiff.calibration import CalibrationError, FunctionSource, olss, teacher_trajectories
from fastdiff.calibration.lstsq import GramAccumulator
from fastdiff.testing.gmm import solver_error
from fastdiff.testing.quality import default_problem
from tests.conftest import run_plan


@pytest.fixture(scope="module")
def problem():
    return default_problem(dim=16, components=4, batch=32, seed=3)


@pytest.fixture(scope="module")
def source(problem):
    x_cal = torch.randn(40, 16, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return FunctionSource(problem.mixture.denoiser(problem.schedule), problem.schedule, x_cal, name="gmm")


@pytest.fixture(scope="module")
def traj(source):
    return teacher_trajectories(source, "ddim:40", progress=False)


def test_gram_fit_equals_direct_least_squares():
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(7, 3, 5, 3, generator=gen, dtype=torch.float64)
    true = torch.tensor([0.5, -2.0, 1.5], dtype=torch.float64)
    target = torch.einsum("j,sjhw->shw", true, basis) + 0.01 * torch.randn(7, 5, 3, generator=gen, dtype=torch.float64)
    acc = GramAccumulator(["a", "b", "c", "y"], folds=3)
    vectors = torch.cat([basis, target[:, None]], dim=1)
    acc.add(vectors[:4], np.arange(4))  # accumulating in pieces changes nothing
    acc.add(vectors[4:], np.arange(4, 7))
    fit = acc.fit(["a", "b", "c"], "y", ridge=0)
    a = basis.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    y = target.reshape(-1).numpy()
    direct, *_ = np.linalg.lstsq(a, y, rcond=None)
    np.testing.assert_allclose(fit.coef, direct, rtol=1e-10)
    assert fit.mse == pytest.approx(float(np.mean((a @ direct - y) ** 2)), rel=1e-8)
    assert abs(fit.coef - true.numpy()).max() < 0.02


def test_auto_ridge_is_the_cross_validation_minimum():
    from fastdiff.calibration.lstsq import RIDGE_GRID

    gen = torch.Generator().manual_seed(1)
    a = torch.randn(9, 1, 3, generator=gen, dtype=torch.float64)
    b = a + 1e-4 * torch.randn(9, 1, 3, generator=gen, dtype=torch.float64)  # nearly collinear with a
    y = a + 0.3 * torch.randn(9, 1, 3, generator=gen, dtype=torch.float64)
    acc = GramAccumulator(["a", "b", "y"], folds=3)
    acc.add(torch.cat([a, b, y], dim=1), np.arange(9))
    auto = acc.fit(["a", "b"], "y", ridge="auto")
    # brute force on the raw data: fold f = samples s with s % 3 == f, ridge scaled by mean diag
    x = torch.cat([a, b], dim=1).permute(0, 2, 1).numpy()  # [S, D, 2]
    t = y[:, 0].numpy()
    errors = []
    for lam in RIDGE_GRID:
        sse = 0.0
        for f in range(3):
            train, test = np.arange(9) % 3 != f, np.arange(9) % 3 == f
            xa, ya = x[train].reshape(-1, 2), t[train].reshape(-1)
            g = xa.T @ xa
            c = np.linalg.solve(g + lam * np.mean(np.diag(g)) * np.eye(2), xa.T @ ya)
            sse += float(((x[test].reshape(-1, 2) @ c - t[test].reshape(-1)) ** 2).sum())
        errors.append(sse / t.size)
    best = int(np.argmin(errors))
    assert auto.ridge == RIDGE_GRID[best] and auto.cv_mse == pytest.approx(errors[best], rel=1e-6)
    assert errors[best] < errors[0]  # some ridge beats plain least squares on held-out samples here


def test_singular_and_zero_bases_are_named():
    acc = GramAccumulator(["a", "b", "z", "y"], folds=2)
    a = torch.randn(4, 1, 6, dtype=torch.float64)
    acc.add(torch.cat([a, 2 * a, torch.zeros_like(a), a], dim=1), np.arange(4))
    with pytest.raises(CalibrationError, match="basis vector z is zero"):
        acc.fit(["a", "z"], "y")
    with pytest.raises(CalibrationError, match="singular.*ridge=0"):
        acc.fit(["a", "b"], "y", ridge=0)
    assert np.isfinite(acc.fit(["a", "b"], "y", ridge="auto").coef).all()


def test_teacher_trajectories_hold_the_teachers_latents_and_outputs(traj, source):
    plan = traj.teacher
    assert traj.latents.shape == (40, 41, 16) and traj.outputs.shape == (40, 40, 16)
    x0 = run_plan(plan, source.model_fn, source.x_T)
    np.testing.assert_allclose(traj.latents[:, -1], x0.float().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(traj.latents[:, 0], source.x_T.float().numpy())
    t = torch.full((40,), float(plan.times[7]), dtype=torch.float32)
    out7 = source.model_fn(torch.from_numpy(traj.latents[:, 7]).double(), t)
    np.testing.assert_allclose(traj.outputs[:, 7], out7.float().numpy(), rtol=1e-4, atol=1e-5)


def test_rows_reproduce_the_teacher_on_its_own_grid(source):
    # With every teacher call in the path, each row can copy the teacher's own step exactly.
    small = teacher_trajectories(source, "ddim:5", progress=False)
    fit = olss.fit(small, list(range(5)), ridge=0)
    assert max(r["rel_residual"] for r in fit.rows) < 1e-5
    np.testing.assert_allclose(fit.plan.coef, small.teacher.coef, atol=1e-3)


@pytest.mark.parametrize("closed_loop", [False, True])
def test_olss_5_steps_beats_dpm_solver_at_5_and_is_a_valid_plan(problem, source, traj, closed_loop):
    from fastdiff import solvers

    fit = olss.fit(traj, olss.uniform_path(traj.num_teacher_steps, 5), closed_loop=closed_loop, source=source)
    plan = fit.plan
    assert plan.nfe == 5 and plan.metadata["solver"] == "olss"
    assert plan.metadata["calibration"]["closed_loop"] is closed_loop and len(fit.rows) == 5
    plan.check_schedule(problem.schedule)
    ours, _ = solver_error(plan, problem.mixture, problem.schedule, problem.x_T, problem.reference)
    dpm, _ = solver_error(
        solvers.build_variant("dpmpp_2m", problem.schedule, 5),
        problem.mixture,
        problem.schedule,
        problem.x_T,
        problem.reference,
    )
    assert ours < dpm


def test_planned_path_follows_algorithms_1_to_3(traj):
    path, bound = olss.plan_path(traj, 4)
    assert len(path) == 4 and path[0] == 0 and all(b > a for a, b in zip(path, path[1:]))
    planner = olss._Planner(olss.teacher_gram(traj, 5), traj.num_teacher_steps, "auto")
    # feasible at the bound found, infeasible a little below it (bisection converged)
    assert planner.greedy(4, bound, traj.num_teacher_steps) is not None
    assert planner.greedy(4, bound * 0.9, traj.num_teacher_steps) is None
    # Algorithm 1 returns the farthest index within the bound, and the next is beyond it
    j = planner.farthest((0,), bound, traj.num_teacher_steps)
    assert planner.error((0,), j) <= bound
    if j < traj.num_teacher_steps:
        assert planner.error((0,), j + 1) > bound


def test_calibrate_returns_a_plan_with_its_calibration_record(problem, source):
    plan = olss.calibrate(source, None, 4, teacher="ddim:30", path="planned", closed_loop=True, progress=False)
    record = plan.metadata["calibration"]
    assert plan.nfe == 4 and record["path_kind"] == "planned" and record["max_error"] > 0
    assert record["samples"] == 40 and len(record["rows"]) == 4 and record["teacher"] == "ddim:30"
    assert plan.schedule_fingerprint == problem.schedule.fingerprint


def test_closed_loop_fit_on_some_samples_is_the_fit_of_those_samples(problem, source, traj):
    path = [0, 9, 20, 31]
    part = olss.fit(traj, path, closed_loop=True, source=source, samples=np.arange(20)).plan
    small = FunctionSource(source.model_fn, source.schedule, source.x_T[:20], name="gmm")
    alone = olss.fit(teacher_trajectories(small, "ddim:40", progress=False), path, closed_loop=True, source=small).plan
    np.testing.assert_allclose(part.coef, alone.coef, rtol=1e-6, atol=1e-9)
    assert part.metadata["calibration"]["samples"] == 20
    full = olss.fit(traj, path, closed_loop=True, source=source).plan
    assert not np.allclose(full.coef, part.coef)  # the other 20 samples do change the fit
    with pytest.raises(ValueError, match="closed-loop fit"):
        olss.fit(traj, path, samples=np.arange(20))
    with pytest.raises(ValueError, match="indices into the 40"):
        olss.fit(traj, path, closed_loop=True, source=source, samples=np.arange(35, 45))


def test_trajectories_resume_after_an_interruption(source, tmp_path):
    calls = {"n": 0}

    class Flaky(FunctionSource):
        def model(self, ids):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return super().model(ids)

    flaky = Flaky(source.model_fn, source.schedule, source.x_T, name="gmm")
    with pytest.raises(KeyboardInterrupt):
        teacher_trajectories(flaky, "ddim:10", directory=tmp_path, batch_size=8, progress=False)
    done = np.load(tmp_path / "state.npy")[:, 0]
    assert done.sum() == 16  # two batches landed before the interruption
    resumed = teacher_trajectories(flaky, "ddim:10", directory=tmp_path, batch_size=8, progress=False)
    assert calls["n"] == 3 + 3  # only the three missing batches ran again
    fresh = teacher_trajectories(source, "ddim:10", progress=False)
    np.testing.assert_allclose(np.asarray(resumed.latents), fresh.latents, rtol=1e-6, atol=1e-7)


def test_a_directory_of_another_calibration_is_refused(source, tmp_path):
    teacher_trajectories(source, "ddim:10", directory=tmp_path, progress=False)
    with pytest.raises(CalibrationError, match="another calibration .*teacher"):
        teacher_trajectories(source, "ddim:12", directory=tmp_path, progress=False)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="corrupt"):
        teacher_trajectories(source, "ddim:10", directory=tmp_path, progress=False)


def test_bad_input_is_named(problem, source):
    from fastdiff import solvers
    from fastdiff.schedules import DiscreteSchedule

    few = FunctionSource(source.model_fn, source.schedule, source.x_T[:1])
    with pytest.raises(CalibrationError, match="needs at least 2 calibration samples, got 1"):
        olss.calibrate(few, None, 5, progress=False)
    other = DiscreteSchedule.from_config(
        {"beta_schedule": "linear", "prediction_type": "v_prediction", "clip_sample": False}
    )
    with pytest.raises(CalibrationError, match="teacher/student schedule mismatch"):
        olss.calibrate(source, None, 3, teacher=solvers.build("ddim", other, 10), progress=False)

    def nan_model(x, t):
        return source.model_fn(x, t) * float("nan")

    with pytest.raises(CalibrationError, match=r"NaN/inf in the teacher's model output at call 0"):
        olss.calibrate(nan_model, source.x_T, 3, schedule=source.schedule, teacher="ddim:10", progress=False)
    with pytest.raises(ValueError, match="path must be one of 'planned', 'uniform', 'searched'"):
        olss.calibrate(source, None, 3, path="random", progress=False)
    with pytest.raises(ValueError, match="'searched' optimises the closed-loop error"):
        olss.calibrate(source, None, 3, path="searched", closed_loop=False, progress=False)


def test_engine_calibration_cli_and_shipped_plan_lookup(untrained_shapes_dir, tmp_path, capsys):
    import shutil

    import fastdiff
    from fastdiff.cli import main
    from fastdiff.plan import PlanError, StepPlan

    model = tmp_path / "model"
    shutil.copytree(untrained_shapes_dir, model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n" * 3)
    out = model / "plans" / "olss-3.json"
    argv = ["calibrate", "--model", str(model), "--device", "cpu", "--steps", "3", "--teacher", "ddim:12"]
    argv += ["--prompts", str(prompts), "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| row | target |" in printed and f"wrote {out}" in printed
    plan = StepPlan.load(out)
    assert plan.nfe == 3 and plan.metadata["calibration"]["command"].startswith("fastdiff calibrate")
    engine = fastdiff.build_engine(model, device="cpu")
    assert engine.shipped_plans() == [3]
    sample = engine.sample("a red circle on a blue background", steps=3, sampler="olss", seed=0)
    assert sample.nfe == [3] * len(sample.prompts) and sample.plan == plan
    with pytest.raises(ValueError, match=r"ships no olss plan for 4 steps \(shipped: 3\).*fastdiff calibrate"):
        engine.sample("a red circle", steps=4, sampler="olss")
    # a plan for another schedule is refused when loaded against this model
    foreign = StepPlan(
        plan.times,
        plan.coef,
        plan.prediction_type,
        schedule_fingerprint="sha256:0000000000000000",
        num_train_timesteps=1000,
        metadata=plan.metadata,
    )
    foreign.save(model / "plans" / "olss-5.json")
    with pytest.raises(PlanError, match="plan was made for schedule sha256:0000000000000000"):
        engine.sample("a red circle", steps=5, sampler="olss")


def test_cli_calibrates_several_step_counts_from_one_teacher_run(untrained_shapes_dir, tmp_path, capsys):
    from fastdiff.calibration import trajectories
    from fastdiff.cli import main
    from fastdiff.plan import StepPlan

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a white background\n" * 2)
    argv = ["calibrate", "--model", str(untrained_shapes_dir), "--device", "cpu", "--teacher", "ddim:8"]
    argv += ["--prompts", str(prompts), "--path", "uniform"]
    assert main(argv + ["--steps", "2", "3", "--out", str(tmp_path / "p.json")]) == 2
    assert "--out must be a directory" in capsys.readouterr().err

    runs = []
    real = trajectories.reference.run

    def counting_run(program, *args, **kwargs):
        runs.append(program.num_steps)
        return real(program, *args, **kwargs)

    trajectories.reference.run = counting_run
    try:
        assert main(argv + ["--steps", "2", "3", "--out", str(tmp_path / "plans")]) == 0
    finally:
        trajectories.reference.run = real
    # the 4 prompts fit in one teacher batch, run once for both plans (the other loop runs are the
    # closed-loop fits' student prefixes of 1..3 calls)
    assert [n for n in runs if n == 8] == [8] and max(n for n in runs if n != 8) <= 3
    for n, path in ((2, [0, 4]), (3, [0, 3, 5])):  # OLSS-P: an even subsample of the 8 teacher calls
        plan = StepPlan.load(tmp_path / "plans" / f"olss-{n}.json")
        assert plan.nfe == n and plan.metadata["calibration"]["path"] == path
    assert "wrote " + str(tmp_path / "plans" / "olss-3.json") in capsys.readouterr().out


def test_quality_study_measures_olss_and_solvers_on_held_out_samples():
    from fastdiff.testing import olss_quality as oq

    study = oq.gmm_study(calibration_samples=32, teacher="ddim:50", dim=16)
    teacher, _ = study.measure("teacher", 3)
    dpm, _ = study.measure("dpmpp_2m", 5)
    ours, plan = study.measure("olss_uniform_open", 5)
    assert teacher["nfe"] == 50 and dpm["nfe"] == ours["nfe"] == 5 and plan.metadata["solver"] == "olss"
    assert ours["path"] == [0, 10, 20, 30, 40]
    assert ours["rel_error"] < dpm["rel_error"] and teacher["rel_error"] < dpm["rel_error"]
    # the held-out set is not the calibration set
    assert not torch.equal(study.held_out.x_T[:32].float(), study.calibration.x_T.float())


def test_path_search_lowers_the_held_out_closed_loop_error(source, traj):
    start = olss.uniform_path(traj.num_teacher_steps, 4)
    val = np.arange(0, traj.num_samples, 4)
    train = np.setdiff1d(np.arange(traj.num_samples), val)
    fits = olss._fit_closed(traj, start, "auto", 5, source, 16, False, samples=train)
    before = olss._student_error(traj, start, olss._plan_coef(fits), source, val, 16)
    path, after = olss.search_path(traj, start, source, sweeps=1)
    assert path[0] == 0 and len(path) == 4 and all(b > a for a, b in zip(path, path[1:]))
    assert after <= before  # a move is kept only if it lowers the validation error
    if path == start:
        assert after == pytest.approx(before)
    plan = olss.calibrate(source, None, 4, teacher="ddim:40", path="searched", progress=False)
    record = plan.metadata["calibration"]
    assert record["path_kind"] == "searched" and record["search_validation_error"] > 0
