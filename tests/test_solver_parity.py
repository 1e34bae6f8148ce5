"""Every solver reproduces its diffusers scheduler loop.

For the same config, step count, x_T and model function, ``executor.run(plan, ...)`` must give
the final latent of the diffusers loop (x_T·init_noise_sigma -> scale_model_input -> model ->
step) to <= 1e-5 relative RMS in float32, and the model must see the same timesteps (exactly)
and the same inputs. The model is the exact ε/v/x_0 of a Gaussian mixture, so magnitudes are
realistic; latents have an awkward shape (3, 3, 5, 7).
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import solvers
from fastdiff.executor import run
from fastdiff.schedules import DiscreteSchedule
from fastdiff.testing import GaussianMixture
from tests.conftest import SD_CONFIG, odd_latents, rel_rms

TOL = 1e-5

DIFFUSERS_CLASS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
}

VARIANTS = [
    ("ddim", {}),
    ("ddim", {"set_alpha_to_one": True}),
    ("pndm", {}),
    ("pndm", {"skip_prk_steps": True}),
    ("euler", {}),
    ("euler", {"use_karras_sigmas": True}),
    ("dpmpp_2m", {}),
    ("dpmpp_2m", {"solver_order": 3}),
    ("dpmpp_2m", {"use_karras_sigmas": True}),
    ("dpmpp_2m", {"solver_order": 3, "use_karras_sigmas": True}),
    ("dpmpp_2m", {"solver_type": "heun"}),
    ("dpmpp_2m", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    ("unipc", {}),
    ("unipc", {"solver_order": 3}),
    ("unipc", {"solver_order": 1}),
    ("unipc", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    ("unipc", {"predict_x0": False, "final_sigmas_type": "sigma_min"}),
    ("unipc", {"disable_corrector": [0, 2]}),
    ("unipc", {"use_karras_sigmas": True}),
    ("deis", {}),
    ("deis", {"use_karras_sigmas": True}),
]

# diffusers' own float32 arithmetic deviates from its float64 result by more than TOL here
# (DEIS's third-order coefficients subtract nearly equal antiderivatives in float32; see
# test_diffusers_float32_deis3_is_the_limit). These are compared with diffusers run in float64.
FLOAT64_REFERENCE = [("deis", {"solver_order": 3})]


def _diffusers_loop(scheduler, steps: int, model_fn, x_T: torch.Tensor, *, float64: bool = False):
    scheduler.set_timesteps(steps)
    if float64:
        for name in ("alphas_cumprod", "final_alpha_cumprod", "sigmas"):
            value = getattr(scheduler, name, None)
            if isinstance(value, torch.Tensor):
                setattr(scheduler, name, value.double())
        x_T = x_T.double()
    latents = x_T * scheduler.init_noise_sigma
    calls = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        t_batch = torch.full((x_T.shape[0],), float(t), dtype=torch.float32)
        calls.append((model_input.clone(), float(t)))
        latents = scheduler.step(model_fn(model_input, t_batch), t, latents).prev_sample
    return latents, calls


def _compare(diffusers, name, options, prediction_type, spacing, steps, *, float64_reference=False):
    config = {**SD_CONFIG, "prediction_type": prediction_type, "timestep_spacing": spacing}
    schedule = DiscreteSchedule.from_config(config)
    model = GaussianMixture.random(3 * 5 * 7, 4, seed=1).denoiser(schedule)
    x_T = odd_latents()
    plan = solvers.build(name, schedule, steps, **options)

    scheduler = getattr(diffusers, DIFFUSERS_CLASS[name]).from_config({**config, **options})
    expected, expected_calls = _diffusers_loop(scheduler, steps, model, x_T, float64=float64_reference)

    calls = []

    def recording_model(x, t):
        calls.append((x.clone(), t.clone()))
        return model(x, t)

    result = run(plan, recording_model, x_T)
    assert len(calls) == len(expected_calls) == plan.nfe
    assert [float(t[0]) for _, t in calls] == [t for _, t in expected_calls], "model times differ"
    assert all(torch.all(t == t[0]) for _, t in calls)
    worst_input = max(rel_rms(x, ref) for (x, _), (ref, _) in zip(calls, expected_calls))
    assert worst_input <= TOL, f"model inputs differ by {worst_input:.2e}"
    error = rel_rms(result, expected)
    assert error <= TOL, f"final latent differs by {error:.2e}"


def _cases():
    for name, options in VARIANTS:
        for pred in ("epsilon", "v_prediction"):
            for spacing in ("leading", "trailing", "linspace"):
                for steps in (4, 7, 20):
                    yield pytest.param(
                        name, options, pred, spacing, steps, id=f"{name}-{options}-{pred}-{spacing}-{steps}"
                    )


@pytest.mark.parametrize("name, options, prediction_type, spacing, steps", list(_cases()))
def test_plan_reproduces_diffusers_loop(diffusers, name, options, prediction_type, spacing, steps):
    _compare(diffusers, name, options, prediction_type, spacing, steps)


@pytest.mark.parametrize(
    "name, options",
    [("ddim", {}), ("euler", {}), ("dpmpp_2m", {}), ("unipc", {"solver_order": 3}), ("deis", {})],
)
def test_sample_prediction_models(diffusers, name, options):
    _compare(diffusers, name, options, "sample", "trailing", 9)


@pytest.mark.parametrize("name, options", FLOAT64_REFERENCE)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [4, 7, 20])
def test_plan_matches_diffusers_float64_where_its_float32_is_the_limit(
    diffusers, name, options, prediction_type, spacing, steps
):
    _compare(diffusers, name, options, prediction_type, spacing, steps, float64_reference=True)


def test_diffusers_float32_deis3_is_the_limit(diffusers):
    """Why DEIS order 3 is held to diffusers' float64 run: its own float32 run is further away."""
    config = {**SD_CONFIG, "timestep_spacing": "leading", "solver_order": 3}
    schedule = DiscreteSchedule.from_config(config)
    model = GaussianMixture.random(3 * 5 * 7, 4, seed=1).denoiser(schedule)
    x_T = odd_latents()
    f32, _ = _diffusers_loop(diffusers.DEISMultistepScheduler.from_config(config), 20, model, x_T)
    f64, _ = _diffusers_loop(diffusers.DEISMultistepScheduler.from_config(config), 20, model, x_T, float64=True)
    ours = run(solvers.build("deis", schedule, 20, solver_order=3), model, x_T)
    assert rel_rms(f32, f64) > TOL
    assert rel_rms(ours, f64) < 1e-6


def test_unipc_bh1_to_sigma_zero_is_finite_where_diffusers_gives_nan(diffusers, sd_schedule):
    """diffusers evaluates B(h)·0 with B(h) = −∞ on bh1's last step; the plan skips the zero term."""
    model = GaussianMixture.random(3 * 5 * 7, 4, seed=1).denoiser(sd_schedule)
    x_T = odd_latents()
    scheduler = diffusers.UniPCMultistepScheduler.from_config({**SD_CONFIG, "solver_type": "bh1"})
    expected, _ = _diffusers_loop(scheduler, 6, model, x_T)
    assert torch.isnan(expected).all()
    result = run(solvers.build("unipc", sd_schedule, 6, solver_type="bh1"), model, x_T)
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
    assert solvers.names() == ["ddim", "pndm", "euler", "dpmpp_2m", "unipc", "deis"]


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
