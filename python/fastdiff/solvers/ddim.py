"""DDIM (Song et al. 2021, eq. 12 with η = 0), as diffusers' DDIMScheduler runs it."""

from __future__ import annotations

import numpy as np

from ..schedules import DiscreteSchedule, data_prediction, noise_prediction
from .common import (
    NONLINEAR,
    Trace,
    check_grid,
    check_steps,
    n_point_timesteps,
    refuse,
    resolve_options,
)

DEFAULTS = {
    "timestep_spacing": "leading",
    "steps_offset": 0,
    "set_alpha_to_one": True,
    "clip_sample": True,
    "thresholding": False,
    "eta": 0.0,
}


def build(schedule: DiscreteSchedule, steps: int, **options):
    """DDIM: x_prev = √ᾱ_prev·x̂_0 + √(1−ᾱ_prev)·ε̂ (deterministic, η = 0)."""
    steps = check_steps("ddim", steps, schedule)
    opts = resolve_options("ddim", schedule, options, DEFAULTS)
    refuse(
        "ddim",
        opts,
        {
            "clip_sample": (False, f"clamping x̂_0 to a range is {NONLINEAR}; pass clip_sample=False"),
            "thresholding": (False, f"dynamic thresholding is {NONLINEAR}"),
            "eta": (0.0, "η > 0 adds fresh noise every step (a stochastic sampler)"),
        },
    )
    num_train = schedule.num_train_timesteps
    timesteps = n_point_timesteps(num_train, steps, opts["timestep_spacing"], opts["steps_offset"])
    check_grid("ddim", timesteps, schedule)
    ac = schedule.alphas_cumprod
    final_ac = 1.0 if opts["set_alpha_to_one"] else ac[0]
    pred = schedule.prediction_type
    # diffusers steps back by T // N whatever the spacing, so with "linspace" or "trailing" the
    # intermediate noise level can differ from the next call's; the plan reproduces that.
    stride = num_train // steps

    trace = Trace(len(timesteps))
    x = trace.x_T()
    prev_ac = final_ac
    for t in timesteps.astype(np.int64):
        out = trace.call(x, t)
        a_t = ac[t]
        prev = t - stride
        prev_ac = ac[prev] if prev >= 0 else final_ac
        alpha, sigma = np.sqrt(a_t), np.sqrt(1 - a_t)
        x0 = data_prediction(out, x, alpha, sigma, pred)
        eps = noise_prediction(out, x, alpha, sigma, pred)
        x = np.sqrt(prev_ac) * x0 + np.sqrt(1 - prev_ac) * eps
    return trace.finish(
        x,
        schedule,
        solver="ddim",
        steps=steps,
        options=opts,
        out_sigma=float(np.sqrt((1 - prev_ac) / prev_ac)),
        diffusers_class="DDIMScheduler",
    )
