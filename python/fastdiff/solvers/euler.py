"""Euler in σ-space (Karras et al. 2022, Alg. 1 without churn), as diffusers'
EulerDiscreteScheduler runs it: the latent it steps is x/α, the model sees x/√(σ²+1)."""

from __future__ import annotations

import numpy as np

from ..schedules import DiscreteSchedule
from .common import (
    SolverError,
    Trace,
    check_grid,
    check_steps,
    karras_sigmas,
    refuse,
    resolve_options,
)

DEFAULTS = {
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_type": "discrete",
    "final_sigmas_type": "zero",
    "s_churn": 0.0,
}


def _grid(schedule: DiscreteSchedule, steps: int, opts: dict) -> tuple[np.ndarray, np.ndarray]:
    """(model timesteps as float32 values, sigmas with the final one appended)."""
    num_train = schedule.num_train_timesteps
    spacing, offset = opts["timestep_spacing"], opts["steps_offset"]
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train - 1, steps, dtype=np.float32)[::-1].copy()
    elif spacing == "leading":
        ratio = num_train // steps
        timesteps = (np.arange(0, steps) * ratio).round()[::-1].copy().astype(np.float32) + offset
    elif spacing == "trailing":
        ratio = num_train / steps
        timesteps = np.arange(num_train, 0, -ratio).round().copy().astype(np.float32) - 1
    else:
        raise SolverError(f"euler: unknown timestep_spacing {spacing!r}: expected leading, trailing or linspace")
    table32 = schedule.diffusers_float32_tables["ve_sigmas"]
    if opts["interpolation_type"] == "linear":
        # Fractional ("linspace") timesteps get the linear interpolation of σ between neighbours.
        sigmas = np.interp(timesteps, np.arange(num_train), schedule.ve_sigma_table)
        grid32 = np.interp(timesteps, np.arange(num_train), table32)
    else:
        raise SolverError(f"euler: interpolation_type={opts['interpolation_type']!r} is not supported (linear)")
    if opts["use_karras_sigmas"]:
        lo = opts["sigma_min"] if opts["sigma_min"] is not None else float(grid32[-1])
        hi = opts["sigma_max"] if opts["sigma_max"] is not None else float(grid32[0])
        sigmas = karras_sigmas(lo, hi, steps)
        timesteps = schedule.t_of_ve_sigma_f32(sigmas).astype(np.float32)
    if opts["final_sigmas_type"] == "zero":
        last = 0.0
    elif opts["final_sigmas_type"] == "sigma_min":
        last = schedule.ve_sigma_table[0]
    else:
        raise SolverError(f"euler: final_sigmas_type must be 'zero' or 'sigma_min', got {opts['final_sigmas_type']!r}")
    # diffusers keeps σ in float32; the plan keeps the float64 σ of the same grid.
    return timesteps.astype(np.float64), np.append(sigmas, last)


def build(schedule: DiscreteSchedule, steps: int, **options):
    """Euler: x ← x + (σ_next − σ)·(x − x̂_0)/σ on x/α, starting from x_T·init_noise_sigma."""
    steps = check_steps("euler", steps, schedule)
    opts = resolve_options("euler", schedule, options, DEFAULTS)
    refuse(
        "euler",
        opts,
        {
            "use_exponential_sigmas": (False, "only the default and Karras sigmas are implemented"),
            "use_beta_sigmas": (False, "only the default and Karras sigmas are implemented"),
            "timestep_type": ("discrete", "continuous timesteps (0.25·log σ) are not implemented"),
            "s_churn": (0.0, "churn adds fresh noise every step (a stochastic sampler)"),
        },
    )
    timesteps, sigmas = _grid(schedule, steps, opts)
    check_grid("euler", timesteps, schedule)
    pred = schedule.prediction_type
    # diffusers' init_noise_sigma: σ_max for linspace/trailing (the VE convention), √(σ_max²+1)
    # for leading; the model input divides by √(σ²+1), so the two differ slightly at t_max.
    sigma_max = float(np.max(sigmas.astype(np.float32)))
    init = sigma_max if opts["timestep_spacing"] in ("linspace", "trailing") else np.sqrt(sigma_max**2 + 1)

    trace = Trace(len(timesteps))
    sample = init * trace.x_T()
    for i, t in enumerate(timesteps):
        sigma = sigmas[i]
        out = trace.call(sample / np.sqrt(sigma**2 + 1), t)
        if pred == "epsilon":
            x0 = sample - sigma * out
        elif pred == "v_prediction":
            x0 = out * (-sigma / np.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
        else:
            x0 = out
        derivative = (sample - x0) / sigma
        sample = sample + derivative * (sigmas[i + 1] - sigma)
    return trace.finish(
        sample,
        schedule,
        solver="euler",
        steps=steps,
        options=opts,
        out_sigma=float(sigmas[-1]),
        out_alpha=1.0,
        diffusers_class="EulerDiscreteScheduler",
    )
