import json

import numpy as np
import pytest

from fastdiff import solvers
from fastdiff.plan import PLAN_VERSION, PlanError, StepPlan
from fastdiff.schedules import DiscreteSchedule


def small_plan(**kw) -> StepPlan:
    coef = np.array([[1.0, 0, 0], [0.9, -0.1, 0], [0.5, 0.25, -0.25]])
    return StepPlan([700.0, 300.0], coef, "epsilon", **kw)


def test_save_load_round_trips_every_bit(tmp_path, sd_schedule):
    plan = solvers.build("dpmpp_2m", sd_schedule, 13, use_karras_sigmas=True)
    path = plan.save(tmp_path / "plan.json")
    loaded = StepPlan.load(path)
    assert loaded == plan
    assert np.array_equal(loaded.coef, plan.coef) and np.array_equal(loaded.times, plan.times)
    assert loaded.hash() == plan.hash()
    assert json.loads(path.read_text())["version"] == PLAN_VERSION


def test_save_leaves_no_temporary_file(tmp_path):
    small_plan().save(tmp_path / "p.json")
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


def test_hash_ignores_metadata_but_not_coefficients():
    a = small_plan(metadata={"note": "a"})
    b = small_plan(metadata={"note": "b"})
    assert a.hash() == b.hash()
    coef = a.coef.copy()
    coef[2, 1] += 1e-12
    assert StepPlan(a.times, coef, "epsilon").hash() != a.hash()


def test_plans_are_immutable():
    plan = small_plan()
    with pytest.raises(ValueError):
        plan.coef[1, 0] = 0.0
    with pytest.raises(ValueError):
        plan.times[0] = 1.0


def test_nfe_counts_model_calls(sd_schedule):
    assert solvers.build("ddim", sd_schedule, 7).nfe == 7
    assert solvers.build("pndm", sd_schedule, 7).nfe == 16  # 12 Runge-Kutta warm-up calls + 4 PLMS
    assert solvers.build("pndm", sd_schedule, 7, skip_prk_steps=True).nfe == 8


def test_column_lifetimes_of_canonical_form():
    coef = np.array([[1.0, 0, 0, 0], [1.0, 0.5, 0, 0], [0.0, 0.5, 0.5, 0], [0.0, 0.0, 1.0, 1.0]])
    plan = StepPlan([900.0, 600.0, 300.0], coef, "epsilon")
    assert plan.column_lifetimes().tolist() == [1, 2, 3, 3]


@pytest.mark.parametrize(
    "times, coef, pred, code, message",
    [
        ([], [[1.0]], "epsilon", "shape", "'times' is empty"),
        ([1.0], [[1.0, 0]], "epsilon", "shape", r"plan coef has shape \(1, 2\), expected \(2, 2\)"),
        ([np.nan], [[1.0, 0], [1, 1]], "epsilon", "nonfinite", r"times\[0\] is not finite \(nan\)"),
        ([1.0], [[1.0, 0], [np.inf, 1]], "epsilon", "nonfinite", r"coef\[1\]\[0\] is not finite \(inf\)"),
        ([1.0], [[1.0, 0.5], [1, 1]], "epsilon", "triangular", r"coef\[0\]\[1\] is nonzero above the diagonal"),
        ([1.0], [[0.0, 0], [1, 1]], "epsilon", "first_row", "must depend on x_T"),
        ([1.0], [[1.0, 0], [1, 1]], "noise", "prediction_type", "unknown prediction_type 'noise'"),
    ],
)
def test_invalid_plans_are_refused_with_the_reason(times, coef, pred, code, message):
    with pytest.raises(PlanError, match=message) as info:
        StepPlan(times, coef, pred)
    assert info.value.code == code


def test_times_are_checked_against_the_schedule_range():
    with pytest.raises(PlanError, match=r"times\[1\] is outside the schedule's time range \[0, 999\]") as info:
        StepPlan([999.0, 1000.0], np.tril(np.ones((3, 3))), "epsilon", num_train_timesteps=1000)
    assert info.value.code == "time_range"


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(PlanError, match="plain JSON"):
        small_plan(metadata={"array": np.zeros(2)})
    with pytest.raises(PlanError, match="finite numbers"):
        small_plan(metadata={"x": float("nan")}).save(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_check_schedule_refuses_other_schedules_and_prediction_types(sd_schedule):
    plan = solvers.build("ddim", sd_schedule, 5)
    plan.check_schedule(sd_schedule)
    other = DiscreteSchedule.from_config({"beta_schedule": "linear"})
    with pytest.raises(PlanError, match="was made for schedule sha256:"):
        plan.check_schedule(other)
    v_pred = DiscreteSchedule.from_config({**sd_schedule.config, "prediction_type": "v_prediction"})
    with pytest.raises(PlanError, match="expects epsilon model outputs but the model predicts v_prediction"):
        plan.check_schedule(v_pred)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(PlanError, match="cannot open plan file") as info:
        StepPlan.load(tmp_path / "missing.json")
    assert info.value.code == "io"
    path = tmp_path / "broken.json"
    path.write_text('{"format": "fastdiff.stepplan", "version"')
    with pytest.raises(PlanError, match=f"{path.name}: plan file is not valid JSON.*truncated"):
        StepPlan.load(path)


def test_with_metadata_adds_keys_and_keeps_the_plan(sd_schedule):
    plan = solvers.build("ddim", sd_schedule, 4)
    tagged = plan.with_metadata(note="x", solver="renamed")
    assert tagged.metadata["note"] == "x" and tagged.metadata["solver"] == "renamed"
    assert tagged.hash() == plan.hash() and np.array_equal(tagged.coef, plan.coef) and tagged != plan
    assert "note" not in plan.metadata and plan.metadata["solver"] == "ddim"
