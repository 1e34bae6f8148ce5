"""The executor's recurrent form: exact (to float64 rounding), small, and general."""

import numpy as np
import pytest
import torch

from fastdiff import solvers
from fastdiff.executor import run
from fastdiff.plan import StepPlan
from fastdiff.recurrent import compile_plan
from fastdiff.schedules import DiscreteSchedule
from tests.conftest import SD_CONFIG

CLASSIC = [
    # (solver, options, most latents alive at once incl. the model output)
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


@pytest.mark.parametrize("name, options, peak", CLASSIC)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [5, 20, 50])
def test_classic_solvers_cancel_exactly_and_stay_small(name, options, peak, prediction_type, steps):
    schedule = DiscreteSchedule.from_config({**SD_CONFIG, "prediction_type": prediction_type})
    program = solvers.build(name, schedule, steps, **options).recurrent()
    assert program.max_error < 1e-12, "old columns must cancel up to float64 rounding"
    assert program.peak_latents <= peak


def test_dpmpp_2m_carries_two_latents_between_calls(sd_schedule):
    program = solvers.build("dpmpp_2m", sd_schedule, 20).recurrent()
    assert max(program.carried) == 2  # x^(k+1) and the converted prediction x̂_0 of call k


def random_plan(n: int, seed: int) -> StepPlan:
    """A fitted-looking plan (OLSS-like): every row uses every earlier column."""
    rng = np.random.default_rng(seed)
    coef = np.tril(rng.normal(0, 0.5, size=(n + 1, n + 1)))
    coef[:, 0] += 1.0
    return StepPlan(np.linspace(999, 0, n, endpoint=False), coef, "epsilon")


@pytest.mark.parametrize("n, seed", [(1, 0), (2, 1), (5, 2), (10, 3)])
def test_dense_fitted_plans_keep_every_needed_column(n, seed):
    plan = random_plan(n, seed)
    program = plan.recurrent()
    assert program.max_error < 1e-12
    # generic rows need min(k + 2, n - k) dimensions after call k; the compiler keeps latents
    # whole rather than recombining them, so it may carry up to every column so far
    # (DESIGN: "a fitted OLSS plan may keep all N+1")
    for k, carried in enumerate(program.carried):
        assert min(k + 2, n - k) <= carried <= k + 2


@pytest.mark.parametrize("n, seed", [(3, 4), (8, 5)])
def test_executor_equals_the_canonical_sum_in_float64(n, seed):
    plan = random_plan(n, seed)
    gen = torch.Generator().manual_seed(seed)
    x_T = torch.randn(3, 2, 5, 7, generator=gen, dtype=torch.float64)
    outputs = [torch.randn(3, 2, 5, 7, generator=gen, dtype=torch.float64) for _ in range(n)]
    calls = iter(range(n))
    result = run(plan, lambda x, t: outputs[next(calls)].clone(), x_T)
    basis = [x_T] + outputs
    expected = sum(float(c) * b for c, b in zip(plan.coef[-1], basis))
    assert torch.allclose(result, expected, rtol=1e-12, atol=1e-12)


def test_a_thousand_step_teacher_compiles(sd_schedule):
    schedule = DiscreteSchedule.from_config({**SD_CONFIG, "timestep_spacing": "trailing"})
    program = solvers.build("ddim", schedule, 1000).recurrent()
    assert program.peak_latents == 2 and program.max_error < 1e-12


def test_compiling_twice_gives_the_same_program(sd_schedule):
    plan = solvers.build("unipc", sd_schedule, 12)
    assert compile_plan(plan.coef) == compile_plan(plan.coef)
    assert plan.recurrent() is plan.recurrent()
