"""iPNDM (fastdiff.solvers.ipndm): its first order is DDIM in noise prediction (the USF strategy on
the same grid), its Adams-Bashforth weights are the formula's, and it is the strong few-step peer
the literature reports on the exact Gaussian-mixture model."""

from __future__ import annotations

import numpy as np
import pytest

from fastdiff import solvers
from fastdiff.schedules import vp_from_ve
from fastdiff.solvers import SolverError, usf
from tests.test_usf import gmm_error, rel


def test_first_order_is_ddim_in_noise_prediction_on_the_same_grid(sd_schedule):
    grid = usf.dpm_solver_pp(sd_schedule, 7).grid
    ddim = usf.Strategy(grid, tuple(usf.Step(order=1, prediction="eps") for _ in range(7))).compile(sd_schedule)
    plan = solvers.build("ipndm", sd_schedule, 7, solver_order=1)
    assert np.array_equal(plan.times, ddim.times) and rel(plan.coef, ddim.coef) < 1e-13


def test_the_fourth_step_uses_the_fourth_order_weights(sd_schedule):
    """x_4 = α_4·(x_3/α_3 + (σ̄_4 − σ̄_3)·(55ε_3 − 59ε_2 + 37ε_1 − 9ε_0)/24), by hand on the plan's
    coefficient rows (ε-model: the raw output is ε)."""
    plan = solvers.build("ipndm", sd_schedule, 6)
    coef = np.asarray(plan.coef)
    table = sd_schedule.ve_sigma_table  # σ̄ at the model times, as the grid interpolates it
    ve = [float(np.interp(t, np.arange(len(table)), table)) for t in plan.times]
    (a3, _), (a4, _) = vp_from_ve(ve[3]), vp_from_ve(ve[4])
    x3, x4 = coef[3], coef[4]
    eps = [np.eye(coef.shape[1])[k + 1] for k in range(4)]  # call k's output column
    weights = (55 / 24, -59 / 24, 37 / 24, -9 / 24)
    expected = a4 * (x3 / a3 + (ve[4] - ve[3]) * sum(w * eps[3 - j] for j, w in enumerate(weights)))
    assert np.abs(x4 - expected).max() < 1e-12


def test_ipndm_is_the_strong_few_step_peer_on_the_exact_model(sd_schedule):
    """Measured relative errors (trailing spacing): 10 calls iPNDM 0.071 vs DPM-Solver++(2M) 0.096;
    5 calls iPNDM order 2 0.131 vs 0.171 (order 4 warms up through most of 5 steps: 0.195)."""

    def error(name, steps, **options):
        return gmm_error(solvers.build(name, sd_schedule, steps, timestep_spacing="trailing", **options), sd_schedule)

    assert error("ipndm", 10) < 0.8 * error("dpmpp_2m", 10)
    assert error("ipndm", 5, solver_order=2) < 0.85 * error("dpmpp_2m", 5)
    assert error("ipndm", 8) < 0.5 * error("ddim", 8, clip_sample=False)


def test_orders_beyond_adams_bashforth_are_refused(sd_schedule):
    with pytest.raises(SolverError, match="ipndm: .*solver_order.*Adams-Bashforth weights exist for orders 1-4"):
        solvers.build("ipndm", sd_schedule, 10, solver_order=5)
    assert solvers.describe("ipndm").startswith("iPNDM")
