"""S^3 search over USF strategies (fastdiff.calibration.search) on the exact Gaussian mixture: the
searched plan beats the solvers it starts from on held-out noise, GITS's DP is optimal, resumed and
parallel searches reproduce the in-process one, bad input is refused with the reason."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from fastdiff import solvers
from fastdiff.calibration import search as S
from fastdiff.calibration.lstsq import CalibrationError
from fastdiff.calibration.trajectories import FunctionSource, teacher_trajectories
from fastdiff.denoisers import Unguided
from fastdiff.loops import reference
from fastdiff.program import compile as compile_program
from fastdiff.solvers.common import SolverError
from fastdiff.solvers.usf import Step
from fastdiff.testing.gmm import exact_result
from fastdiff.testing.quality import default_problem

TEACHER = "dpmpp_2m:40"


@pytest.fixture(scope="module")
def gmm():
    problem = default_problem(dim=16, batch=32)
    model = problem.mixture.denoiser(problem.schedule)
    x_cal = torch.randn(32, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return problem, model, x_cal


def _held_out_error(problem, plan):
    x = exact_result(plan, problem.mixture, problem.schedule, problem.x_T, problem.reference)
    raw_fn = Unguided(problem.mixture.denoiser(problem.schedule))
    out = reference.run(compile_program(plan), raw_fn, problem.x_T).latents
    return float(torch.linalg.vector_norm(out.double() - x.double()) / torch.linalg.vector_norm(x.double()))


def _search(gmm, nfe=3, **kw):
    problem, model, x_cal = gmm
    kw = {"budget": 45, "teacher": TEACHER, "workers": 1, "progress": False, **kw}
    return S.search(model, x_cal, nfe, schedule=problem.schedule, **kw)


@pytest.fixture(scope="module")
def result(gmm):
    return _search(gmm)


def test_searched_plan_beats_the_solvers_it_starts_from_on_held_out_noise(gmm, result):
    problem = gmm[0]
    plan = result.plan
    assert plan.num_calls == 3 and plan.metadata["solver"] == "usf"
    searched = _held_out_error(problem, plan)
    for name in ("dpmpp_2m", "unipc_bh2", "ipndm"):
        assert searched < 0.7 * _held_out_error(problem, solvers.build_variant(name, problem.schedule, 3)), name
    info = plan.metadata["search"]
    assert info["evaluated"] == 45 and info["model_calls"] == result.calls > 0
    # the proxy is the error on the calibration samples against the teacher: recompute it
    traj = teacher_trajectories(FunctionSource(gmm[1], problem.schedule, gmm[2]), TEACHER, progress=False)
    evaluator = S.Evaluator(
        FunctionSource(gmm[1], problem.schedule, gmm[2]), S.Space(traj, problem.schedule, 3), traj, np.arange(32)
    )
    assert evaluator.error_of(plan) == pytest.approx(result.error, rel=1e-9)
    # best-so-far never increases and ends at the result's error
    curve = result.best_so_far()
    assert all(b[1] <= a[1] for a, b in zip(curve, curve[1:])) and curve[-1][1] == result.error


def test_predictor_rank_correlation_is_measured_on_held_out_strategies(result):
    # a predictor that learned nothing would sit near 0; the search's own strategies are rankable
    assert result.rank_correlation is not None and result.rank_correlation > 0.3
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 5))
    assert abs(S.rank_correlation(x, rng.normal(size=60))) < 0.4  # noise: no correlation
    assert S.rank_correlation(x, x[:, 0] * 3 + 0.01 * rng.normal(size=60)) > 0.9
    assert S.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_resumed_search_equals_the_uninterrupted_one(gmm, tmp_path):
    whole = _search(gmm, budget=40, checkpoint=tmp_path / "whole.jsonl")
    part = tmp_path / "part.jsonl"
    _search(gmm, budget=33, checkpoint=part)  # "killed" after 33 candidates
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])  # and a line cut mid-write
    resumed = _search(gmm, budget=40, checkpoint=part)
    assert [r["key"] for r in resumed.history] == [r["key"] for r in whole.history]
    assert resumed.error == whole.error and resumed.plan.hash() == whole.plan.hash()
    # the resumed run evaluated only what the checkpoint lacked; the file now holds every candidate once
    keys = [json.loads(line)["key"] for line in part.read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys)) == 40


def test_a_checkpoint_of_other_settings_is_refused(gmm, tmp_path):
    ck = tmp_path / "ck.jsonl"
    _search(gmm, budget=31, checkpoint=ck)
    before = ck.read_text()
    with pytest.raises(CalibrationError, match="other settings.*differs in seed"):
        _search(gmm, budget=31, checkpoint=ck, seed=1)
    with pytest.raises(CalibrationError, match="differs in nfe"):
        _search(gmm, nfe=4, budget=31, checkpoint=ck)
    assert ck.read_text() == before  # nothing lost or mixed in
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(CalibrationError, match="not a search checkpoint"):
        _search(gmm, budget=31, checkpoint=bad)


def test_worker_processes_give_the_in_process_result(gmm, result):
    parallel = _search(gmm, workers=2)
    assert [r["key"] for r in parallel.history] == [r["key"] for r in result.history]
    assert [r["error"] for r in parallel.history] == pytest.approx([r["error"] for r in result.history], rel=1e-12)


def test_search_on_a_local_ray_instance(gmm, result):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]')")
    import ray

    try:
        on_ray = _search(gmm, ray_address="local")
    finally:
        ray.shutdown()
    assert [r["key"] for r in on_ray.history] == [r["key"] for r in result.history]
    assert on_ray.error == pytest.approx(result.error, rel=1e-12)


def test_an_unreachable_ray_address_is_a_clear_error_and_loses_nothing(gmm, tmp_path):
    pytest.importorskip("ray", reason="ray is not installed (pip install 'ray[default]')")
    ck = tmp_path / "ck.jsonl"
    _search(gmm, budget=31, checkpoint=ck)
    before = ck.read_text()
    with pytest.raises(CalibrationError, match=r"cannot reach the Ray cluster at '127\.0\.0\.1:9'.*checkpoint"):
        _search(gmm, budget=40, checkpoint=ck, ray_address="127.0.0.1:9")
    assert ck.read_text() == before


def test_gits_dynamic_programming_finds_the_cheapest_path(gmm):
    problem, model, x_cal = gmm
    traj = teacher_trajectories(FunctionSource(model, problem.schedule, x_cal), "dpmpp_2m:9", progress=False)
    for points in (1, 2, 3, 4):
        path = S.tuned_times(traj, points, problem.schedule)
        assert path[0] == 0 and len(path) == points and all(b > a for a, b in zip(path, path[1:]))
        costs = {}
        for rest in itertools.combinations(range(1, 9), points - 1):
            cand = [0, *rest]
            costs[tuple(cand)] = _gits_cost(traj, cand, problem.schedule)
        assert _gits_cost(traj, path, problem.schedule) == pytest.approx(min(costs.values()), rel=1e-9)


def _gits_cost(traj, path, schedule):
    """The sum of one-DDIM-step distances along path (straight from GITS's definition)."""
    from fastdiff.schedules import data_prediction, noise_prediction

    times = np.asarray(traj.times)
    ends = [*path[1:], traj.num_teacher_steps]
    total = 0.0
    for i, j in zip(path, ends):
        a_i, s_i = float(schedule.alpha(times[i])), float(schedule.sigma(times[i]))
        a_j, s_j = (float(schedule.alpha(times[j])), float(schedule.sigma(times[j]))) if j < len(times) else (1.0, 0.0)
        x = torch.from_numpy(np.asarray(traj.latents[:, i], dtype=np.float64))
        raw = torch.from_numpy(np.asarray(traj.outputs[:, i], dtype=np.float64))
        pred = traj.teacher.prediction_type
        step = a_j * data_prediction(raw, x, a_i, s_i, pred) + s_j * noise_prediction(raw, x, a_i, s_i, pred)
        target = torch.from_numpy(np.asarray(traj.latents[:, j], dtype=np.float64))
        total += math.sqrt(float(((step - target) ** 2).mean()))
    return total


def test_gits_schedule_beats_the_uniform_one_for_the_same_solver(gmm):
    problem, model, x_cal = gmm
    traj = teacher_trajectories(FunctionSource(model, problem.schedule, x_cal), TEACHER, progress=False)
    space = S.Space(traj, problem.schedule, 6)
    uniform = S.schedule_indices(space, "uniform_t", 6)
    # (with DDIM itself, whose one-step errors GITS sums, it is not better here: the sum of local
    # errors is not the global error; the solver table shows GITS with the solvers below)
    for solver in ("dpmpp_2m", "unipc_bh2"):
        gits = S.gits_strategy(traj, problem.schedule, 6, solver).compile(problem.schedule)
        plain = space.compile(S.Genome(uniform, S._steps_of(solver, 6, False)))
        assert _held_out_error(problem, gits) < 0.9 * _held_out_error(problem, plain), solver


def test_invalid_candidates_are_rejected_with_the_step_and_the_reason(gmm):
    problem, model, x_cal = gmm
    traj = teacher_trajectories(FunctionSource(model, problem.schedule, x_cal), TEACHER, progress=False)
    space = S.Space(traj, problem.schedule, 3)
    with pytest.raises(SolverError, match="step 0: derivative 1 needs 1 other outputs"):
        space.compile(S.Genome((0, 10, 20), (Step(order=2), Step(), Step())))
    with pytest.raises(SolverError, match="increasing strictly"):
        space.compile(S.Genome((0, 20, 10), (Step(), Step(), Step())))
    with pytest.raises(SolverError, match="step 1: unstable coefficients"):
        space.compile(S.Genome((0, 1, 30), (Step(), Step(order=2, scale=None, relaxation="linear", c=400.0), Step())))
    with pytest.raises(SolverError, match="makes 2 model calls, the space 3"):
        space.compile(S.Genome((0, 10), (Step(), Step())))
    # the evaluator reports the reason instead of calling the model
    record = S.Evaluator(FunctionSource(model, problem.schedule, x_cal), space, traj, np.arange(4))(
        S.Genome((0, 10, 20), (Step(order=3), Step(), Step())).to_dict()
    )
    assert record["error"] is None and record["calls"] == 0 and "step 0" in record["reason"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"budget": 0}, "budget must be"),
        ({"refit": "lsq"}, "refit must be"),
        ({"per_generation": 0}, "per_generation must be"),
        ({"refit_candidates": 0}, "refit_candidates must be"),
        ({"samples": 99}, "samples must be in 1..32"),
    ],
)
def test_bad_search_settings(gmm, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _search(gmm, **kwargs)
    with pytest.raises(ValueError, match="nfe >= 2"):
        _search(gmm, nfe=1)


def test_olss_refit_on_the_searched_times(gmm):
    problem = gmm[0]
    # one candidate: the refit is on the best candidate's times (the first call: the teacher's first)
    res = _search(gmm, nfe=4, budget=30, refit="olss", refit_candidates=1)
    assert list(res.refit_plan.times[1:]) == list(res.plan.times[1:])
    assert len(res.refit_plan.metadata["search"]["refit_candidates"]) == 1
    res = _search(gmm, nfe=4, budget=30, refit="olss")
    refit = res.refit_plan
    assert refit.metadata["solver"] == "usf" and refit.metadata["search"]["refit"] == "olss" and refit.num_calls == 4
    # the best refit of the best 8 candidates with distinct times, each fitted and scored on the search's samples
    tried = refit.metadata["search"]["refit_candidates"]
    valid = sorted((r for r in res.history if r["error"] is not None), key=lambda r: (r["error"], r["key"]))
    paths = []  # the calls' times of the candidates, best first (AFS: its first call moves to the teacher's first)
    for r in valid:
        g = S.Genome.from_dict(r["genome"])
        p = [0, *g.idx[2:]] if g.afs else [0, *g.idx[1:]]
        if p not in paths and all(b > a for a, b in zip(p, p[1:])):
            paths.append(p)
    assert len(paths) > 1 and [p for p, _ in tried] == paths[:8]
    assert res.refit_error == min(e for _, e in tried)
    path = next(p for p, e in tried if e == res.refit_error)
    assert refit.metadata["calibration"]["path"] == path and refit.metadata["calibration"]["samples"] == 32
    assert math.isfinite(_held_out_error(problem, refit))
    # all 32 samples were searched: the choice between the two is in-sample, and says so
    v = res.validation
    assert v["samples"] == 32 and not v["held_out"] and v["olss"] == pytest.approx(res.refit_error, rel=1e-9)
    assert res.best_plan is (refit if v["olss"] < v["search"] else res.plan)
    # with 8 of the samples held out the choice is made on them
    res = _search(gmm, nfe=4, budget=30, refit="olss", samples=24)
    assert res.validation["samples"] == 8 and res.validation["held_out"]
    assert res.refit_plan.metadata["calibration"]["samples"] == 24  # the held-out samples judge, never fit


def test_cli_search_writes_a_plan_per_nfe_and_resumes(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from fastdiff.cli import main
    from fastdiff.plan import StepPlan

    argv = ["search", "--model", "digits", "--device", "cpu", "--nfe", "3", "4", "--budget", "32", "--samples", "8"]
    argv += ["--teacher", "dpmpp_2m:20", "--workers", "1", "--out", str(tmp_path / "plans")]
    argv += ["--checkpoint", str(tmp_path / "ck")]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "USF 3 calls on digits" in text and "USF 4 calls on digits" in text and "rank correlation" in text
    plans = {n: StepPlan.load(tmp_path / "plans" / f"usf-{n}.json") for n in (3, 4)}
    for n, plan in plans.items():
        assert plan.nfe == n and plan.metadata["search"]["command"].startswith("fastdiff search --model digits")
        assert plan.metadata["search"]["evaluated"] == 32
    # resumed from the checkpoints: nothing new is evaluated and the plans are the same
    ck = {n: (tmp_path / "ck" / f"search-{n}.jsonl").read_text() for n in (3, 4)}
    assert main(argv) == 0
    assert {n: (tmp_path / "ck" / f"search-{n}.jsonl").read_text() for n in (3, 4)} == ck
    assert StepPlan.load(tmp_path / "plans" / "usf-3.json").hash() == plans[3].hash()
    capsys.readouterr()
    assert main(argv[:-4] + ["--out", str(tmp_path / "x.json")]) == 2
    assert "must be a directory" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_cli_search_refit_writes_the_better_plan_on_held_out_samples(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from fastdiff.cli import main
    from fastdiff.plan import StepPlan

    argv = ["search", "--model", "digits", "--device", "cpu", "--nfe", "3", "--budget", "16", "--samples", "12"]
    argv += ["--search-samples", "8", "--teacher", "dpmpp_2m:20", "--workers", "1", "--refit", "olss"]
    assert main(argv + ["--out", str(tmp_path / "p.json")]) == 0
    text = capsys.readouterr().out
    assert "4 held-out samples" in text
    plan = StepPlan.load(tmp_path / "p.json")
    v = plan.metadata["search"]["validation"]
    assert v["samples"] == 4 and v["held_out"] and v["chosen"] in ("search", "olss")
    other = tmp_path / ("p.searched.json" if v["chosen"] == "olss" else "p.olss.json")
    assert StepPlan.load(other).hash() != plan.hash()
    assert plan.metadata["solver"] == "usf" and min(v["search"], v["olss"]) == v[v["chosen"]]
