"""The Python and C++ plan readers agree on every file in tests/data/plans (same manifest as
the C++ test): good files load to identical values, bad ones fail with the same code and,
except for JSON syntax errors (each parser words those its own way), the same message."""

import json
from pathlib import Path

import numpy as np
import pytest

from fastdiff.plan import PlanError, StepPlan

DATA = Path(__file__).parent / "data" / "plans"
CASES = json.loads((DATA / "cases.json").read_text())


def _cpp():
    try:
        from fastdiff import _C
    except ImportError as exc:
        pytest.skip(f"C++ extension fastdiff._C not built: {exc}")
    return _C


@pytest.mark.parametrize("name", CASES["good"])
def test_good_files_load(name):
    plan = StepPlan.load(DATA / "good" / name)
    assert plan.nfe == len(plan.times) >= 1


@pytest.mark.parametrize("name, code", sorted(CASES["bad"].items()))
def test_bad_files_are_refused_with_their_code(name, code):
    with pytest.raises(PlanError) as info:
        StepPlan.load(DATA / "bad" / name)
    assert info.value.code == code, str(info.value)


@pytest.mark.parametrize("name", CASES["good"])
def test_cpp_reader_reads_the_same_values(name):
    cpp = _cpp()
    text = (DATA / "good" / name).read_text()
    ours = StepPlan.loads(text)
    theirs = cpp.parse_plan(text)
    assert np.array_equal(theirs["times"], ours.times)
    assert np.array_equal(theirs["coef"], ours.coef)
    assert theirs["prediction_type"] == ours.prediction_type
    assert theirs["schedule_fingerprint"] == ours.schedule_fingerprint
    assert theirs["num_train_timesteps"] == ours.num_train_timesteps


@pytest.mark.parametrize("name, code", sorted(CASES["bad"].items()))
def test_cpp_reader_refuses_bad_files_like_python(name, code):
    cpp = _cpp()
    text = (DATA / "bad" / name).read_text()
    with pytest.raises(PlanError) as py_err:
        StepPlan.loads(text)
    with pytest.raises(PlanError) as cpp_err:
        cpp.parse_plan(text)
    assert cpp_err.value.code == py_err.value.code == code
    if code != "json":
        assert str(cpp_err.value) == str(py_err.value)


def test_cpp_load_plan_reports_missing_files():
    cpp = _cpp()
    with pytest.raises(PlanError) as info:
        cpp.load_plan("/nonexistent/plan.json")
    assert info.value.code == "io"


def test_plans_written_by_python_load_in_cpp(tmp_path, sd_schedule):
    from fastdiff import solvers

    cpp = _cpp()
    plan = solvers.build("unipc", sd_schedule, 9, solver_order=3)
    path = plan.save(tmp_path / "unipc.json")
    loaded = cpp.load_plan(str(path))
    assert np.array_equal(loaded["coef"], plan.coef)
    assert np.array_equal(loaded["times"], plan.times)
