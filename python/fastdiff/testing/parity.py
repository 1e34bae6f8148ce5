"""Solver parity with diffusers: a plan on the reference loop against the diffusers scheduler's own
loop, same config, step count, x_T and exact Gaussian-mixture model.

`compare` runs both and reports the model times (exact), the largest difference of any model
input and of the final latent (relative RMS); tests/test_solver_parity.py holds them to a
tolerance and bench/test_parity_cpu.py records them (bench/results/parity.md).
"""

from __future__ import annotations

import torch

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

# diffusers' own float32 arithmetic deviates from its float64 result by more than the tolerance
# here (DEIS's third-order coefficients subtract nearly equal antiderivatives in float32): these
# are compared with diffusers run in float64.
FLOAT64_REFERENCE = [("deis", {"solver_order": 3})]

PREDICTIONS = ("epsilon", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")
STEPS = (4, 7, 20)
SD_CONFIG = {  # SD 1.x's scheduler config (also the test suite's schedule)
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def cases():
    """(name, options, prediction_type, spacing, steps, float64_reference) of the parity table:
    every variant x ε/v x the three spacings x 4, 7, 20 steps, x_0 models for five solvers."""
    for variants, f64 in ((VARIANTS, False), (FLOAT64_REFERENCE, True)):
        for name, options in variants:
            for pred in PREDICTIONS:
                for spacing in SPACINGS:
                    for steps in STEPS:
                        yield name, options, pred, spacing, steps, f64
    for name, options in [("ddim", {}), ("euler", {}), ("dpmpp_2m", {}), ("unipc", {"solver_order": 3}), ("deis", {})]:
        yield name, options, "sample", "trailing", 9, False


def latents() -> torch.Tensor:
    """x_T of an awkward shape: batch 3, 3 channels, 5x7 (seed 0)."""
    return torch.randn(3, 3, 5, 7, generator=torch.Generator().manual_seed(0))


def diffusers_loop(scheduler, steps: int, model_fn, x_T: torch.Tensor, *, float64: bool = False):
    """diffusers' sampling loop (x_T·init_noise_sigma -> scale_model_input -> model -> step):
    (final latent, [(model input, t) per call])."""
    scheduler.set_timesteps(steps)
    if float64:
        for name in ("alphas_cumprod", "final_alpha_cumprod", "sigmas"):
            value = getattr(scheduler, name, None)
            if isinstance(value, torch.Tensor):
                setattr(scheduler, name, value.double())
        x_T = x_T.double()
    sample = x_T * scheduler.init_noise_sigma
    calls = []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        t_batch = torch.full((x_T.shape[0],), float(t), dtype=torch.float32)
        calls.append((model_input.clone(), float(t)))
        sample = scheduler.step(model_fn(model_input, t_batch), t, sample).prev_sample
    return sample, calls


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def compare(name, options, prediction_type, spacing, steps, float64_reference=False) -> dict:
    """One parity case: {"calls", "expected_calls", "times_equal", "input_error", "result_error"}."""
    import diffusers

    from .. import solvers
    from ..denoisers import Unguided
    from ..loops import reference
    from ..program import compile as compile_program
    from ..schedules import DiscreteSchedule
    from .gmm import GaussianMixture

    config = {**SD_CONFIG, "prediction_type": prediction_type, "timestep_spacing": spacing}
    schedule = DiscreteSchedule.from_config(config)
    model = GaussianMixture.random(3 * 5 * 7, 4, seed=1).denoiser(schedule)
    x_T = latents()
    plan = solvers.build(name, schedule, steps, **options)
    scheduler = getattr(diffusers, DIFFUSERS_CLASS[name]).from_config({**config, **options})
    expected, expected_calls = diffusers_loop(scheduler, steps, model, x_T, float64=float64_reference)

    calls = []

    def recording_model(x, t):
        calls.append((x.clone(), t.clone()))
        return model(x, t)

    result = reference.run(compile_program(plan), Unguided(recording_model), x_T).latents
    pairs = list(zip(calls, expected_calls))
    return {
        "calls": len(calls),
        "expected_calls": len(expected_calls),
        "times_equal": len(calls) == len(expected_calls) and all(torch.all(t == ref_t) for (_, t), (_, ref_t) in pairs),
        "input_error": max((_rel_rms(x, ref) for (x, _), (ref, _) in pairs), default=0.0),
        "result_error": _rel_rms(result, expected),
    }
