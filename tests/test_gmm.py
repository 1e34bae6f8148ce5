"""The analytic Gaussian-mixture harness: exact ε, exact ODE solutions."""

import math

import numpy as np
import pytest
import torch

from fastdiff import solvers
from fastdiff.testing import GaussianMixture, solver_error
from fastdiff.testing.quality import SOLVER_VARIANTS, default_problem, markdown_table, measure


def test_integrator_matches_the_closed_form_for_one_gaussian():
    g = GaussianMixture([1.0], [np.linspace(-1, 1, 6)], [np.linspace(0.05, 0.8, 6) ** 2])
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    for sigma_end in (0.0, 0.03, 1.0):
        numeric = g.ode_solution(x, 14.6, sigma_end)
        exact = g.gaussian_ode_solution(x, 14.6, sigma_end)
        assert (numeric - exact).abs().max().item() <= 1e-8


def test_eps_is_minus_sigma_times_the_score():
    g = GaussianMixture.random(7, 3, seed=4)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    sigma = 0.7
    (score,) = torch.autograd.grad(g.log_prob_ve(x, sigma).sum(), x)
    assert torch.allclose(g.eps_ve(x.detach(), sigma), -sigma * score, atol=1e-12)


def test_log_prob_integrates_to_one_in_one_dimension():
    g = GaussianMixture([1.0, 3.0], [[-1.0], [2.0]], [[0.09], [0.25]])
    grid = torch.linspace(-8, 10, 20001, dtype=torch.float64)[:, None]
    density = g.log_prob_ve(grid, 0.5).exp()
    assert torch.trapezoid(density, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-9)


def test_samples_have_the_mixture_moments():
    g = GaussianMixture([1.0, 1.0], [[-2.0, 0.0], [2.0, 1.0]], [[0.25, 1.0], [0.25, 4.0]])
    x = g.sample(200_000, torch.Generator().manual_seed(0))
    assert x.mean(0).tolist() == pytest.approx([0.0, 0.5], abs=0.02)
    assert x[:, 1].var().item() == pytest.approx(0.5 * 1 + 0.5 * 4 + 0.25, rel=0.02)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_denoiser_outputs_are_consistent_across_parametrisations(sd_schedule, prediction_type):
    g = GaussianMixture.random(12, 4, seed=5)
    x = torch.randn(3, 3, 4, dtype=torch.float64)
    t = torch.tensor([999.0, 500.5, 3.0])
    out = g.denoiser(sd_schedule, prediction_type)(x, t)
    eps = g.denoiser(sd_schedule, "epsilon")(x, t)
    alpha = torch.tensor(sd_schedule.alpha(t.numpy()))[:, None, None]
    sigma = torch.tensor(sd_schedule.sigma(t.numpy()))[:, None, None]
    x0 = (x - sigma * eps) / alpha
    want = {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]
    assert torch.allclose(out, want, atol=1e-10)


def test_many_step_solvers_converge_to_the_exact_solution():
    problem = default_problem(dim=8, components=3, batch=8)
    errors = [
        solver_error(
            solvers.build("deis", problem.schedule, n),
            problem.mixture,
            problem.schedule,
            problem.x_T,
            problem.reference,
        )[0]
        for n in (25, 100, 400)
    ]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 2e-3


def test_quality_rows_and_table():
    problem = default_problem(dim=8, components=3, batch=4)
    rows = [measure(problem, label, n) for label in ("dpmpp_2m", "pndm") for n in (3, 5)]
    assert rows[0]["nfe"] == 3 and math.isfinite(rows[0]["rel_error"])
    assert rows[2]["rel_error"] is None and "steps >= 4" in rows[2]["skipped"]
    table = markdown_table(rows, (3, 5))
    assert "| dpmpp_2m |" in table and "| pndm | — | " in table and "(14)" in table
    assert set(SOLVER_VARIANTS) >= {"ddim", "pndm", "euler", "dpmpp_2m", "unipc_bh2", "deis"}


def test_mixture_arguments_are_validated():
    with pytest.raises(ValueError, match="variances must match"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[1.0]])
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture([1.0], [[0.0]], [[0.0]])
    with pytest.raises(ValueError, match="has dim 3"):
        GaussianMixture.random(3, 2).eps_ve(torch.zeros(2, 4), 1.0)
