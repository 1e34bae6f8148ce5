"""The compiled Program: exact (to float64 rounding), small, general, cached, and verified when it
comes from a plan file."""

import json

import numpy as np
import pytest
import torch

from fastdiff import program, solvers
from fastdiff.loops import reference
from fastdiff.plan import PlanError, StepPlan
from fastdiff.program import Program, ProgramError
from fastdiff.schedules import DiscreteSchedule
from tests.conftest import SD_CONFIG

CLASSIC = [
    # (solver, options, most latents a loop holds besides the model output)
    ("ddim", {}, 2),
    ("euler", {}, 2),
    ("euler", {"use_karras_sigmas": True}, 2),
    ("dpmpp_2m", {}, 3),
    ("dpmpp_2m", {"use_karras_sigmas": True}, 3),
    ("dpmpp_2m", {"solver_order": 3}, 5),
    ("deis", {}, 3),
    ("deis", {"solver_order": 3}, 5),
    ("unipc", {}, 5),
    ("unipc", {"solver_order": 3}, 7),
    ("pndm", {"skip_prk_steps": True}, 7),
    ("pndm", {}, 13),
]


@pytest.mark.parametrize("name, options, rows", CLASSIC)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [5, 20, 50])
def test_classic_solvers_cancel_exactly_and_stay_small(name, options, rows, prediction_type, steps):
    schedule = DiscreteSchedule.from_config({**SD_CONFIG, "prediction_type": prediction_type})
    compiled = program.compile(solvers.build(name, schedule, steps, **options))
    assert compiled.max_error < 1e-12, "old columns must cancel up to float64 rounding"
    assert compiled.num_rows <= rows
    assert compiled.width % program.MIN_WIDTH == 0 and compiled.num_steps == compiled.plan.nfe


def test_dpmpp_2m_carries_two_latents_between_calls(sd_schedule):
    compiled = program.compile(solvers.build("dpmpp_2m", sd_schedule, 20))
    assert max(compiled.carried) == 2  # x^(k+1) and the converted prediction x̂_0 of call k


def random_plan(n: int, seed: int) -> StepPlan:
    """A fitted-looking plan (OLSS-like): every row uses every earlier column."""
    rng = np.random.default_rng(seed)
    coef = np.tril(rng.normal(0, 0.5, size=(n + 1, n + 1)))
    coef[:, 0] += 1.0
    return StepPlan(np.linspace(999, 0, n, endpoint=False), coef, "epsilon")


@pytest.mark.parametrize("n, seed", [(1, 0), (2, 1), (5, 2), (10, 3)])
def test_dense_fitted_plans_keep_every_needed_column(n, seed):
    compiled = program.compile(random_plan(n, seed))
    assert compiled.max_error < 1e-12
    # generic rows need min(k + 2, n - k) dimensions after call k; the compiler keeps latents
    # whole rather than recombining them, so it may carry up to every column so far
    # (DESIGN: "a fitted OLSS plan may keep all N+1")
    for k, carried in enumerate(compiled.carried):
        assert min(k + 2, n - k) <= carried <= k + 2


@pytest.mark.parametrize("n, seed", [(3, 4), (8, 5)])
def test_a_fitted_program_equals_the_canonical_sum_in_float64(n, seed):
    plan = random_plan(n, seed)
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(3, 2, 5, 7, generator=gen, dtype=torch.float64)
    outputs = [torch.randn(3, 2, 5, 7, generator=gen, dtype=torch.float64) for _ in range(n)]
    calls = iter(range(n))
    result = reference.run(program.compile(plan), lambda x, t, i: outputs[next(calls)].clone(), x_T).latents
    expected = sum(float(c) * b for c, b in zip(plan.coef[-1], [x_T] + outputs))
    assert torch.allclose(result, expected, rtol=1e-12, atol=1e-12)


def test_a_thousand_step_teacher_compiles():
    schedule = DiscreteSchedule.from_config({**SD_CONFIG, "timestep_spacing": "trailing"})
    compiled = program.compile(solvers.build("ddim", schedule, 1000))
    assert compiled.num_rows == 2 and compiled.max_error < 1e-12


def test_compiling_is_deterministic_and_cached(sd_schedule):
    plan = solvers.build("unipc", sd_schedule, 12)
    first = program.compile(plan)
    assert program.compile(plan) is first
    twin = solvers.build("unipc", sd_schedule, 12)  # an equal plan, another object
    assert program.compile(twin).to_dict() == first.to_dict() and program.compile(twin).plan is twin
    program._compiled.clear()
    assert program.compile(plan).to_dict() == first.to_dict()


def test_device_tables_are_made_once_per_device_and_dtype(sd_schedule):
    compiled = program.compile(solvers.build("dpmpp_2m", sd_schedule, 6))
    a = compiled.tables("cpu", torch.float16)
    assert compiled.tables("cpu", torch.bfloat16) is a  # both compute in float32
    f64 = compiled.tables("cpu", torch.float64)
    assert f64.coef.dtype == torch.float64 and a.coef.dtype == torch.float32 and a.times.dtype == torch.float32
    assert a.times.tolist() == [float(np.float32(t)) for t in compiled.times]


# ---------------------------------------------------------------- the cache in plan files
def test_a_plan_file_carries_its_program_and_reads_back_verified(sd_schedule, tmp_path):
    compiled = program.compile(solvers.build("unipc", sd_schedule, 6))
    path = program.save(compiled, tmp_path / "plan.json")
    doc = json.loads(path.read_text())
    assert doc["program"] == compiled.to_dict()
    assert StepPlan.load(path) == compiled.plan  # plan readers ignore the cache
    loaded = program.load(path)
    assert loaded.to_dict() == compiled.to_dict() and loaded.max_error == compiled.max_error
    plain = tmp_path / "plain.json"
    compiled.plan.save(plain)
    assert program.load(plain).to_dict() == compiled.to_dict()  # compiled when there is no cache


@pytest.mark.parametrize(
    "name, message",
    [
        ("bad_coef", r"call 3's input differs from coef row 3 by 0\.248 \(the program was compiled for another plan"),
        ("bad_other_plan", "call 1's input differs from coef row 1"),
        ("bad_size", r"x_row must be an array of 6 entries, found 5 entries"),
    ],
)
def test_corrupt_or_foreign_programs_are_refused_as_the_cpp_reader_does(name, message):
    path = f"tests/data/programs/{name}.json"
    with pytest.raises(ProgramError, match=message) as info:
        program.load(path)
    assert info.value.code == "program" and str(info.value).startswith(f"{path}: plan program: ")
    assert isinstance(info.value, PlanError)


def test_malformed_program_fields_are_named(sd_schedule):
    compiled = program.compile(solvers.build("ddim", sd_schedule, 4))
    doc = compiled.to_dict()
    with pytest.raises(ProgramError, match="src must be an array of 4 entries, found 'nope'"):
        program.from_dict({**doc, "src": "nope"}, compiled.plan)
    with pytest.raises(ProgramError, match="width must be an integer, found a number"):
        program.from_dict({**doc, "width": 8.5}, compiled.plan)
    with pytest.raises(ProgramError, match=r"dst\[0\]\[1\] must be an integer, found a boolean"):
        program.from_dict({**doc, "dst": [[doc["dst"][0][0], True], *doc["dst"][1:]]}, compiled.plan)
    with pytest.raises(ProgramError, match=r"x_row\[0\] is out of range, found 10000000000"):
        program.from_dict({**doc, "x_row": [10**10, *doc["x_row"][1:]]}, compiled.plan)
    with pytest.raises(ProgramError, match=r"gcoef\[0\]\[1\] is not finite \(nan\)"):
        program.from_dict({**doc, "gcoef": [[doc["gcoef"][0][0], float("nan")], *doc["gcoef"][1:]]}, compiled.plan)
    with pytest.raises(ProgramError, match="field 'coef' is missing"):
        program.from_dict({k: v for k, v in doc.items() if k != "coef"}, compiled.plan)
    with pytest.raises(ProgramError, match="reads row 1, which holds nothing at that point"):
        src = np.array(doc["src"])
        src[0, 1, 1] = 1
        program.from_dict({**doc, "src": src.tolist()}, compiled.plan)
    with pytest.raises(ProgramError, match="'program' must be an object, found an array"):
        program.from_dict([1, 2], compiled.plan)
    with pytest.raises(TypeError, match="compile needs a StepPlan"):
        program.compile(compiled)


def test_the_compiler_refuses_a_linear_program_reading_a_freed_column():
    from fastdiff.program import _Linear, _LinOp, _Step, _tables

    init = _LinOp(1, (0,), (1.0,))
    steps = (
        _Step(1, 2, (_LinOp(1, (1, 2), (1.0, 0.5)),), (2,), 1),
        _Step(1, 3, (_LinOp(1, (1, 3, 2), (1.0, 0.5, 0.1)),), (3,), 1),  # slot 2 was freed
    )
    with pytest.raises(ProgramError, match=r"call 1: an op reads slot 2, which is released after call 0"):
        _tables(_Linear(init, steps, 1, 4, 3, (1, 1)))
    never = _Linear(init, (_Step(1, 2, (_LinOp(1, (1, 3), (1.0, 1.0)),), (2,), 1),), 1, 4, 3, (1,))
    with pytest.raises(ProgramError, match="slot 3, which is never written"):
        _tables(never)


def test_programs_describe_themselves(sd_schedule):
    compiled = program.compile(solvers.build("ddim", sd_schedule, 4))
    assert isinstance(compiled, Program) and compiled.key == compiled.plan.hash()
    assert repr(compiled).startswith("Program(StepPlan(ddim, nfe=4") and "2 rows" in repr(compiled)


def test_extrapolation_rows_continue_a_line_and_copy_where_times_repeat(sd_schedule):
    times = np.array([999.0, 900.0, 700.0, 650.0, 650.0, 100.0])
    rows = program.extrapolation_rows(times)
    assert rows.shape == (6, 2) and np.array_equal(rows[:2], [[1.0, 0.0], [1.0, 0.0]])
    for k in (2, 3):  # g linear in t is predicted exactly
        g = lambda t: 3.0 - 0.01 * t  # noqa: E731
        assert rows[k, 0] * g(times[k - 1]) + rows[k, 1] * g(times[k - 2]) == pytest.approx(g(times[k]))
    assert np.array_equal(rows[5], [1.0, 0.0])  # t_4 == t_3: no line, the last output is repeated
    plan = solvers.build("dpmpp_2m", sd_schedule, 10)
    compiled = program.compile(plan)
    assert np.array_equal(compiled.reuse_rows("extrapolate"), program.extrapolation_rows(plan.times))
    assert np.array_equal(compiled.reuse_rows("copy"), np.tile([1.0, 0.0], (10, 1)))
    with pytest.raises(ValueError, match="reuse must be one of extrapolate, copy, got 'last'"):
        compiled.reuse_rows("last")
    table = compiled.reuse_table("cpu", torch.float16, "copy")
    assert table.dtype == torch.float32 and table is compiled.reuse_table("cpu", torch.float32, "copy")
