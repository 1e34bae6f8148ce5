"""Every solver reproduces its diffusers scheduler loop.

For the same config, step count, x_T and model function, the reference loop on the plan must give
the final latent of the diffusers loop (x_T·init_noise_sigma -> scale_model_input -> model ->
step) to <= 1e-5 relative RMS in float32, and the model must see the same timesteps (exactly)
and the same inputs. The model is the exact ε/v/x_0 of a Gaussian mixture, so magnitudes are
realistic; latents have an awkward shape (3, 3, 5, 7).
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import solvers
from fastdiff.schedules import DiscreteSchedule
from fastdiff.testing import GaussianMixture, parity
from tests.conftest import SD_CONFIG, odd_latents, rel_rms, run_plan

TOL = 1e-5


def _ids(case):
    name, options, pred, spacing, steps, f64 = case
    return f"{name}-{options}-{pred}-{spacing}-{steps}" + ("-f64" if f64 else "")


@pytest.mark.parametrize("case", list(parity.cases()), ids=_ids)
def test_plan_reproduces_diffusers_loop(diffusers, case):
    """Float64-reference cases (DEIS order 3) compare with diffusers run in float64: its float32
    run is the limit there (test_diffusers_float32_deis3_is_the_limit)."""
    got = parity.compare(*case)
    assert got["calls"] == got["expected_calls"] and got["times_equal"], "model times differ"
    assert got["input_error"] <= TOL, f"model inputs differ by {got['input_error']:.2e}"
    assert got["result_error"] <= TOL, f"final latent differs by {got['result_error']:.2e}"


def test_diffusers_float32_deis3_is_the_limit(diffusers):
    """Why DEIS order 3 is held to diffusers' float64 run: its own float32 run is further away."""
    config = {**SD_CONFIG, "timestep_spacing": "leading", "solver_order": 3}
    schedule = DiscreteSchedule.from_config(config)
    model = GaussianMixture.random(3 * 5 * 7, 4, seed=1).denoiser(schedule)
    x_T = odd_latents()
    f32, _ = parity.diffusers_loop(diffusers.DEISMultistepScheduler.from_config(config), 20, model, x_T)
    f64, _ = parity.diffusers_loop(diffusers.DEISMultistepScheduler.from_config(config), 20, model, x_T, float64=True)
    ours = run_plan(solvers.build("deis", schedule, 20, solver_order=3), model, x_T)
    assert rel_rms(f32, f64) > TOL
    assert rel_rms(ours, f64) < 1e-6


def test_unipc_bh1_to_sigma_zero_is_finite_where_diffusers_gives_nan(diffusers, sd_schedule):
    """diffusers evaluates B(h)·0 with B(h) = −∞ on bh1's last step; the plan skips the zero term."""
    model = GaussianMixture.random(3 * 5 * 7, 4, seed=1).denoiser(sd_schedule)
    x_T = odd_latents()
    scheduler = diffusers.UniPCMultistepScheduler.from_config({**SD_CONFIG, "solver_type": "bh1"})
    expected, _ = parity.diffusers_loop(scheduler, 6, model, x_T)
    assert torch.isnan(expected).all()
    result = run_plan(solvers.build("unipc", sd_schedule, 6, solver_type="bh1"), model, x_T)
    assert torch.isfinite(result).all()


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("ddim", {"clip_sample": True}, "clip_sample=True is not supported: clamping"),
        ("ddim", {"thresholding": True}, "thresholding=True is not supported"),
        ("ddim", {"eta": 0.5}, "stochastic"),
        ("euler", {"s_churn": 1.0}, "stochastic"),
        ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, "stochastic"),
        (
            "dpmpp_2m",
            {"algorithm_type": "dpmsolver"},
            "final_sigmas_type='zero' needs algorithm_type='dpmsolver\\+\\+'",
        ),
        ("dpmpp_2m", {"solver_order": 4}, "solver_order=4 is not supported"),
        ("dpmpp_2m", {"use_lu_lambdas": True}, "use_lu_lambdas=True is not supported"),
        ("unipc", {"predict_x0": False}, "predict_x0=False cannot step to σ = 0"),
        ("pndm", {}, "needs steps >= 4"),
        ("dpmpp_2m", {"karras": True}, "unknown option 'karras'; dpmpp_2m accepts:"),
        ("euler", {"prediction_type": "epsilon"}, "prediction_type comes from the model's schedule"),
    ],
)
def test_options_a_plan_cannot_express_are_refused(sd_schedule, name, options, message):
    steps = 3 if name == "pndm" else 10
    with pytest.raises(solvers.SolverError, match=message):
        solvers.build(name, sd_schedule, steps, **options)


def test_default_ddim_clips_like_diffusers_so_it_is_refused():
    schedule = DiscreteSchedule.from_config({"beta_schedule": "linear"})  # no clip_sample key
    with pytest.raises(solvers.SolverError, match="pass clip_sample=False"):
        solvers.build("ddim", schedule, 10)


@pytest.mark.parametrize("steps", [0, -3, 2.5, "10", 1001])
def test_bad_step_counts_are_refused(sd_schedule, steps):
    with pytest.raises(solvers.SolverError, match="steps"):
        solvers.build("dpmpp_2m", sd_schedule, steps)


def test_unknown_solver_lists_the_known_ones(sd_schedule):
    with pytest.raises(solvers.SolverError, match="unknown solver 'lms': expected one of ddim, pndm, euler"):
        solvers.build("lms", sd_schedule, 10)
    assert solvers.names() == ["ddim", "pndm", "euler", "dpmpp_2m", "unipc", "deis", "ipndm"]


def test_options_come_from_the_config_unless_given(sd_schedule):
    """diffusers' precedence: explicit option > config key > scheduler default."""
    config = {**SD_CONFIG, "timestep_spacing": "trailing", "solver_order": 3}
    schedule = DiscreteSchedule.from_config(config)
    plan = solvers.build("dpmpp_2m", schedule, 10)
    assert plan.times[0] == 999 and plan.metadata["options"]["solver_order"] == 3
    plan = solvers.build("dpmpp_2m", schedule, 10, solver_order=2, timestep_spacing="leading")
    assert plan.times[0] == 901 and plan.metadata["options"]["solver_order"] == 2
    plan = solvers.build("dpmpp_2m", sd_schedule, 10)  # no timestep_spacing in config: DPM default
    assert plan.metadata["options"]["timestep_spacing"] == "linspace"
