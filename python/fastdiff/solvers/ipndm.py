"""iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator",
App. B: the improved pseudo numerical method): the noise prediction ε̂ extrapolated by
Adams-Bashforth's fixed weights (1; 3/2, −1/2; 23/12, −16/12, 5/12; 55/24, −59/24, 37/24,
−9/24: order 1 to 4, warming up one order per step) and integrated over the VE form of the ODE,
x̄ = x/α against σ̄ = σ/α, where dx̄/dσ̄ = ε exactly:

    x_{i+1} = α_{i+1}·(x_i/α_i + (σ̄_{i+1} − σ̄_i)·ε̄_i)

(order 1 is DDIM). A training-free peer that is strong at 4-6 calls in the few-step literature
(PAPERS.md). diffusers has no iPNDM for discrete-time schedules (its IPNDMScheduler runs its own
continuous cosine schedule), so the grid is DPM-Solver's (`dpmpp.multistep_grid`: diffusers'
timestep spacings, Karras sigmas, the last step to σ = 0) and the plan is checked against the
formula, not against a diffusers scheduler.
"""

from __future__ import annotations

import numpy as np

from ..schedules import DiscreteSchedule, noise_prediction, vp_from_ve
from .common import SolverError, Trace, check_steps, refuse, resolve_options

DEFAULTS = {
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "solver_order": 4,
    "use_karras_sigmas": False,
    "final_sigmas_type": "zero",
}

ADAMS_BASHFORTH = {  # weights of the newest, then older, outputs
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def build(schedule: DiscreteSchedule, steps: int, **options):
    """iPNDM: noise prediction, Adams-Bashforth with fixed weights, order 1-4 (default 4)."""
    from . import dpmpp

    steps = check_steps("ipndm", steps, schedule)
    opts = resolve_options("ipndm", schedule, options, DEFAULTS)
    refuse("ipndm", opts, {"solver_order": ((1, 2, 3, 4), "Adams-Bashforth weights exist for orders 1-4")})
    timesteps, sigmas = dpmpp.multistep_grid(schedule, steps, opts, "ipndm")
    sigmas = np.append(sigmas, dpmpp.final_sigma(schedule, sigmas, opts["final_sigmas_type"], "ipndm", False))
    vp = [vp_from_ve(float(s)) for s in sigmas]
    if any(not np.isfinite(s) for s in sigmas):
        raise SolverError("ipndm: the grid has an infinite sigma")
    trace = Trace(len(timesteps))
    x = trace.x_T()
    history: list[np.ndarray] = []  # ε̂, newest last
    for i, t in enumerate(timesteps):
        out = trace.call(x, t)
        alpha_s, sigma_s = vp[i]
        history = (history + [noise_prediction(out, x, alpha_s, sigma_s, schedule.prediction_type)])[
            -opts["solver_order"] :
        ]
        weights = ADAMS_BASHFORTH[len(history)]
        eps = sum(w * e for w, e in zip(weights, reversed(history)))
        alpha_t = vp[i + 1][0]
        x = alpha_t * (x / alpha_s + (float(sigmas[i + 1]) - float(sigmas[i])) * eps)
    return trace.finish(
        x,
        schedule,
        solver="ipndm",
        steps=steps,
        options=opts,
        out_sigma=float(sigmas[-1]),
        diffusers_class="",
    )
