"""USF strategies (fastdiff.solvers.usf): known solvers expressed as strategies reproduce their
plans, the integrals and derivative estimates are exact where they should be, the strategy space
compiles to plans that run (higher orders, correctors, the analytical first step), and invalid
strategies are refused with the step and the reason."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff import solvers
from fastdiff.solvers import SolverError, usf
from fastdiff.solvers.usf import Grid, Step, Strategy
from fastdiff.testing.gmm import GaussianMixture, solver_error


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


# ---------------------------------------------------------------- known solvers as strategies
@pytest.mark.parametrize("steps", [5, 8, 20, 25])
@pytest.mark.parametrize("order, midpoint", [(2, True), (2, False), (3, True)])
def test_dpm_solver_pp_as_a_strategy_is_its_plan(sd_schedule, steps, order, midpoint):
    strategy = usf.dpm_solver_pp(sd_schedule, steps, order=order, midpoint=midpoint)
    got = strategy.compile(sd_schedule)
    want = solvers.build(
        "dpmpp_2m", sd_schedule, steps, solver_order=order, solver_type="midpoint" if midpoint else "heun"
    )
    assert np.array_equal(got.times, want.times)
    assert rel(got.coef, want.coef) < 1e-13


@pytest.mark.parametrize("steps", [5, 8, 20])
@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_ddim_as_a_strategy_is_its_plan(sd_schedule, steps, alpha_to_one):
    got = usf.ddim(sd_schedule, steps, set_alpha_to_one=alpha_to_one).compile(sd_schedule)
    want = solvers.build("ddim", sd_schedule, steps, clip_sample=False, set_alpha_to_one=alpha_to_one)
    assert np.array_equal(got.times, want.times) and rel(got.coef, want.coef) < 1e-13
    assert got.metadata["out_sigma"] == pytest.approx(want.metadata["out_sigma"], abs=1e-15)


@pytest.mark.parametrize("steps", [4, 5, 8, 20])
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("bh1", [False, True])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_unipc_as_a_strategy_is_its_plan(sd_schedule, steps, order, bh1, predict_x0):
    """Predictor and corrector: UniPC's solved systems are the exact polynomial quadratures of
    USF's Taylor steps, its fixed 1/2 on B(h) the midpoint / bh1 relaxations."""
    options = {} if predict_x0 else {"final_sigmas_type": "sigma_min"}
    strategy = usf.unipc(sd_schedule, steps, order=order, bh1=bh1, predict_x0=predict_x0, **options)
    want = solvers.build(
        "unipc", sd_schedule, steps, solver_order=order, solver_type="bh1" if bh1 else "bh2",
        predict_x0=predict_x0, **options,
    )  # fmt: skip
    got = strategy.compile(sd_schedule)
    assert np.array_equal(got.times, want.times) and rel(got.coef, want.coef) < 1e-12


# ---------------------------------------------------------------- the pieces are exact
@pytest.mark.parametrize("h", [0.01, 0.15, 0.25, 1.3, 4.0])
@pytest.mark.parametrize("data", [True, False])
def test_the_exponential_integrals_match_quadrature(h, data):
    u = np.linspace(0.0, h, 200001)
    sign = -1.0 if data else 1.0
    for k, value in enumerate(usf._integrals(h, 4, data)):
        f = np.exp(sign * (h - u)) * u**k / math.factorial(k)
        quad = float(np.sum((f[1:] + f[:-1]) * np.diff(u)) / 2)
        assert value == pytest.approx(quad, rel=1e-8), (k, value, quad)


def test_derivatives_of_a_polynomial_are_recovered_exactly():
    coeffs = [0.3, -1.2, 0.7, 2.5]  # F(λ) = Σ c_q λ^q, derivatives at 0: q!·c_q
    dlam = [-0.4, -0.9, 0.35]
    values = [sum(c * d**q for q, c in enumerate(coeffs)) - coeffs[0] for d in dlam]
    for k in (1, 2, 3):
        assert usf._derivative(k, dlam, values) == pytest.approx(math.factorial(k) * coeffs[k], rel=1e-10)


# ---------------------------------------------------------------- the space runs and helps
def gmm_error(plan, schedule) -> float:
    mixture = GaussianMixture.random(12, 3, seed=4)
    x_T = torch.randn(16, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return solver_error(plan, mixture, schedule, x_T)[0]


def test_the_choices_change_the_error_on_the_exact_model_as_the_analysis_predicts(sd_schedule):
    """DPM-Solver++'s 8-step grid ending at sigma_min, every step with the same choice (orders warm
    up from 1). Measured relative errors: data prediction order 1 0.248; noise prediction order 2
    0.037 (a second-order expansion); order 1 with a second-order pseudo-corrector 0.095 (no extra
    call); data prediction order 3 0.86 (the last step's λ-jump to sigma_min, h ≈ 4, makes a cubic
    extrapolation blow up: why a per-step choice matters, the point of USF)."""
    grid = usf.dpm_solver_pp(sd_schedule, 8, timestep_spacing="trailing", final_sigmas_type="sigma_min").grid

    def error(order, prediction="x0", corrector=0):
        steps = [
            Step(order=min(order, i + 1), prediction=prediction, corrector=corrector if i < 7 else 0) for i in range(8)
        ]
        return gmm_error(Strategy(grid, tuple(steps)).compile(sd_schedule), sd_schedule)

    first = error(1)
    assert error(2, "eps") < 0.25 * first
    assert error(1, corrector=2) < 0.5 * first
    assert error(3) > 2 * first


def test_the_analytical_first_step_saves_a_call(sd_schedule):
    grid = usf.dpm_solver_pp(sd_schedule, 6, timestep_spacing="trailing").grid
    steps = tuple(Step(order=1) for _ in range(6))
    plain, afs = Strategy(grid, steps).compile(sd_schedule), Strategy(grid, steps, afs=True).compile(sd_schedule)
    assert plain.nfe == 6 and afs.nfe == 5 and np.array_equal(afs.times, plain.times[1:])
    assert gmm_error(afs, sd_schedule) < 0.5  # a usable sample, not noise
    assert afs.metadata["options"]["strategy"]["afs"] is True


def test_singlestep_starts_and_noise_prediction_compile(sd_schedule):
    grid = usf.dpm_solver_pp(sd_schedule, 6, timestep_spacing="trailing").grid
    steps = (Step(), Step(order=2, start=1), Step(order=2, start=2), Step(order=3, prediction="eps"))
    steps += (Step(order=2, relaxation="linear", c=0.3), Step())
    plan = Strategy(grid, steps).compile(sd_schedule)
    baseline = usf.dpm_solver_pp(sd_schedule, 6, timestep_spacing="trailing").compile(sd_schedule)
    # measured: 0.136 against DPM-Solver++(2M)'s 0.135 on this grid (its last, first-order jump to
    # sigma 0 dominates both)
    assert plan.nfe == 6 and gmm_error(plan, sd_schedule) < 1.2 * gmm_error(baseline, sd_schedule)
    one_back = Strategy(grid, steps[:2] + (Step(order=2, start=1),) + steps[3:]).compile(sd_schedule)
    assert rel(one_back.coef, plan.coef) > 1e-3  # starting two points back is another update


# ---------------------------------------------------------------- bad strategies
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"order": 5}, "order must be an integer in 1..4"),
        ({"prediction": "v"}, "prediction must be one of x0, eps"),
        ({"order": 3, "points": (1,)}, "points needs one entry per derivative"),
        ({"order": 3, "points": (2, 1)}, "derivative 2 needs 2..4 points"),
        ({"relaxation": "cubic"}, "relaxation must be one of"),
        ({"start": 0}, "start must be 1"),
        ({"corrector": 9}, "corrector must be an order in 0..4"),
    ],
)
def test_invalid_steps_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(SolverError, match=message):
        Step(**kwargs)


def test_strategies_that_cannot_run_name_the_step(sd_schedule):
    grid = usf.dpm_solver_pp(sd_schedule, 4).grid
    with pytest.raises(SolverError, match="step 1: derivative 1 needs 2 other outputs, only 1 exist"):
        Strategy(grid, (Step(), Step(order=3), Step(), Step())).compile(sd_schedule)
    with pytest.raises(SolverError, match="step 3: a Taylor order above 1 into σ = 0"):
        Strategy(grid, (Step(), Step(order=2), Step(order=2), Step(order=2))).compile(sd_schedule)
    with pytest.raises(SolverError, match="step 1: start 3 reaches before the first point"):
        Strategy(grid, (Step(), Step(order=2, start=3), Step(), Step())).compile(sd_schedule)
    with pytest.raises(SolverError, match="no corrector on the last step"):
        Strategy(grid, (Step(), Step(), Step(), Step(corrector=2)))
    with pytest.raises(SolverError, match="4 grid steps but 3 step strategies"):
        Strategy(grid, (Step(),) * 3)
    with pytest.raises(SolverError, match=r"λ increasing\): point 1"):
        Grid((900.0, 800.0), (0.1, 0.05, 1.0), (0.99, 0.998, 0.0))
    with pytest.raises(SolverError, match="only timestep_spacing='leading'"):
        usf.ddim(sd_schedule, 10, timestep_spacing="trailing")
