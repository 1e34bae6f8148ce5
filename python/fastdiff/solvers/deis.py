"""DEIS (Zhang & Chen 2023) multistep with polynomial extrapolation in log ρ, ρ = σ/α, as
diffusers' DEISMultistepScheduler runs it ("logrho" solver type).

x_t/α_t = x_s/α_s + ∫_{ρ_s}^{ρ_t} ε̂ dρ, with ε̂ the Lagrange polynomial in u = log ρ through
the last 1-3 noise predictions. The integrals of the Lagrange basis have closed forms:
∫(u − c)/(b − c) dρ = ρ(u − 1 − c)/(b − c) and
∫(u − c)(u − d)/((b − c)(b − d)) dρ = ρ(u² − 2u + 2 − (c + d)(u − 1) + cd)/((b − c)(b − d)).
"""

from __future__ import annotations

import numpy as np

from ..schedules import DiscreteSchedule, noise_prediction, vp_from_ve
from .common import (
    NONLINEAR,
    Trace,
    check_steps,
    multistep_order,
    refuse,
    resolve_options,
)
from .dpmpp import multistep_grid

DEFAULTS = {
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "solver_order": 2,
    "algorithm_type": "deis",
    "solver_type": "logrho",
    "lower_order_final": True,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "thresholding": False,
}


def _basis_integral_2(rho: float, b: float, c: float) -> float:
    """Antiderivative at rho of the linear Lagrange basis with node b (other node c), u = log ρ."""
    u, lb, lc = np.log(rho), np.log(b), np.log(c)
    return rho * (u - 1 - lc) / (lb - lc)


def _basis_integral_3(rho: float, b: float, c: float, d: float) -> float:
    """Antiderivative at rho of the quadratic Lagrange basis with node b (others c, d)."""
    u, lb, lc, ld = np.log(rho), np.log(b), np.log(c), np.log(d)
    return rho * (u * u - 2 * u + 2 - (lc + ld) * (u - 1) + lc * ld) / ((lb - lc) * (lb - ld))


def build(schedule: DiscreteSchedule, steps: int, **options):
    """DEIS multistep (log-ρ Adams-Bashforth), order 1-3; ends at the smallest training sigma."""
    steps = check_steps("deis", steps, schedule)
    opts = resolve_options("deis", schedule, options, DEFAULTS)
    if opts["algorithm_type"] in ("dpmsolver", "dpmsolver++"):
        opts["algorithm_type"] = "deis"  # diffusers maps DPM-Solver names onto deis
    if opts["solver_type"] in ("midpoint", "heun", "bh1", "bh2"):
        opts["solver_type"] = "logrho"
    refuse(
        "deis",
        opts,
        {
            "algorithm_type": ("deis", "expected deis"),
            "solver_type": ("logrho", "expected logrho"),
            "solver_order": ((1, 2, 3), "orders 1, 2 and 3 are implemented"),
            "thresholding": (False, f"dynamic thresholding is {NONLINEAR}"),
            "use_exponential_sigmas": (False, "only the default and Karras sigmas are implemented"),
            "use_beta_sigmas": (False, "only the default and Karras sigmas are implemented"),
            "use_flow_sigmas": (False, "flow-matching schedules are not VP schedules"),
        },
    )
    timesteps, sigmas = multistep_grid(schedule, steps, opts, "deis")
    # DEIS ends at the smallest noise level, never at σ = 0 (Karras: the last sigma repeated).
    last = sigmas[-1] if opts["use_karras_sigmas"] else schedule.ve_sigma_table[0]
    sigmas = np.append(sigmas, last)
    order = opts["solver_order"]
    n = len(timesteps)
    pred = schedule.prediction_type
    vp = [vp_from_ve(s) for s in sigmas]
    rho = [s / a for a, s in vp]

    trace = Trace(n)
    x = trace.x_T()
    history: list[np.ndarray] = []
    for i, t in enumerate(timesteps):
        out = trace.call(x, t)
        alpha_s, sigma_s = vp[i]
        history = (history + [noise_prediction(out, x, alpha_s, sigma_s, pred)])[-order:]
        lower_final = opts["lower_order_final"]
        step_order = multistep_order(
            i, n, order, last_first_order=lower_final and n < 15, lower_order_final=lower_final
        )
        alpha_t, sigma_t = vp[i + 1]
        r_t, r0 = rho[i + 1], rho[i]
        if step_order == 1:
            h = np.log(alpha_t / sigma_t) - np.log(alpha_s / sigma_s)
            x = (alpha_t / alpha_s) * x - sigma_t * np.expm1(h) * history[-1]
        elif step_order == 2:
            r1 = rho[i - 1]
            c0 = _basis_integral_2(r_t, r0, r1) - _basis_integral_2(r0, r0, r1)
            c1 = _basis_integral_2(r_t, r1, r0) - _basis_integral_2(r0, r1, r0)
            x = alpha_t * (x / alpha_s + c0 * history[-1] + c1 * history[-2])
        else:
            r1, r2 = rho[i - 1], rho[i - 2]
            c0 = _basis_integral_3(r_t, r0, r1, r2) - _basis_integral_3(r0, r0, r1, r2)
            c1 = _basis_integral_3(r_t, r1, r2, r0) - _basis_integral_3(r0, r1, r2, r0)
            c2 = _basis_integral_3(r_t, r2, r0, r1) - _basis_integral_3(r0, r2, r0, r1)
            x = alpha_t * (x / alpha_s + c0 * history[-1] + c1 * history[-2] + c2 * history[-3])
    return trace.finish(
        x,
        schedule,
        solver="deis",
        steps=steps,
        options=opts,
        out_sigma=float(sigmas[-1]),
        diffusers_class="DEISMultistepScheduler",
    )
