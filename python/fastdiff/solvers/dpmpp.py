"""Multistep DPM-Solver++ and DPM-Solver (Lu et al. 2022, "DPM-Solver++", Alg. 2 and the
third-order update of §B), as diffusers' DPMSolverMultistepScheduler runs them."""

from __future__ import annotations

import numpy as np

from ..schedules import DiscreteSchedule, data_prediction, log_snr, noise_prediction, vp_from_ve
from .common import (
    NONLINEAR,
    SolverError,
    Trace,
    check_grid,
    check_steps,
    karras_sigmas,
    multistep_order,
    n_plus_one_timesteps,
    refuse,
    resolve_options,
)

DEFAULTS = {
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "solver_order": 2,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "thresholding": False,
}


def multistep_grid(schedule: DiscreteSchedule, steps: int, opts: dict, name: str, *, round_karras: bool = True):
    """Timesteps and VE sigmas (without the final one) shared by DPM-Solver, UniPC and DEIS."""
    num_train = schedule.num_train_timesteps
    tables = schedule.diffusers_float32_tables
    clip = opts.get("lambda_min_clipped", -float("inf"))
    clipped = int(np.searchsorted(tables["lambdas"][::-1], clip, side="left"))
    last = num_train - clipped
    timesteps = n_plus_one_timesteps(num_train, last, steps, opts["timestep_spacing"], opts["steps_offset"])
    if opts["use_karras_sigmas"]:
        table32 = tables["ve_sigmas"]
        lo = opts.get("sigma_min") if opts.get("sigma_min") is not None else float(table32[0])
        hi = opts.get("sigma_max") if opts.get("sigma_max") is not None else float(table32[-1])
        sigmas = karras_sigmas(lo, hi, steps)
        timesteps = schedule.t_of_ve_sigma_f32(sigmas)
        if round_karras:
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64).astype(np.float64)  # diffusers casts to int64
    else:
        sigmas = np.interp(timesteps, np.arange(num_train), schedule.ve_sigma_table)
    check_grid(name, timesteps, schedule)
    return timesteps, sigmas


def final_sigma(
    schedule: DiscreteSchedule, sigmas: np.ndarray, kind: str, name: str, karras_min_is_last: bool
) -> float:
    if kind == "zero":
        return 0.0
    if kind == "sigma_min":
        return float(sigmas[-1]) if karras_min_is_last else float(schedule.ve_sigma_table[0])
    raise SolverError(f"{name}: final_sigmas_type must be 'zero' or 'sigma_min', got {kind!r}")


def build(schedule: DiscreteSchedule, steps: int, **options):
    """DPM-Solver++ (data prediction) or DPM-Solver (noise prediction), multistep, order 1-3."""
    steps = check_steps("dpmpp_2m", steps, schedule)
    opts = resolve_options("dpmpp_2m", schedule, options, DEFAULTS)
    # diffusers maps other schedulers' names for these onto its own (so shared configs load)
    if opts["algorithm_type"] == "deis":
        opts["algorithm_type"] = "dpmsolver++"
    if opts["solver_type"] in ("logrho", "bh1", "bh2"):
        opts["solver_type"] = "midpoint"
    refuse(
        "dpmpp_2m",
        opts,
        {
            "algorithm_type": (
                ("dpmsolver++", "dpmsolver"),
                "the SDE variants add fresh noise every step (stochastic samplers)",
            ),
            "solver_type": (("midpoint", "heun"), "expected midpoint or heun"),
            "solver_order": ((1, 2, 3), "diffusers implements orders 1, 2 and 3"),
            "thresholding": (False, f"dynamic thresholding is {NONLINEAR}"),
            "variance_type": (None, "learned-variance outputs (extra channels) are not supported"),
            "use_exponential_sigmas": (False, "only the default and Karras sigmas are implemented"),
            "use_beta_sigmas": (False, "only the default and Karras sigmas are implemented"),
            "use_lu_lambdas": (False, "only the default and Karras sigmas are implemented"),
            "use_flow_sigmas": (False, "flow-matching schedules are not VP schedules"),
        },
    )
    data_pred = opts["algorithm_type"] == "dpmsolver++"
    if not data_pred and opts["final_sigmas_type"] == "zero":
        raise SolverError(
            "dpmpp_2m: final_sigmas_type='zero' needs algorithm_type='dpmsolver++' "
            "(diffusers refuses it too); use final_sigmas_type='sigma_min'"
        )
    # diffusers leaves Karras timesteps of the cosine schedule unrounded (then truncates them)
    cosine = schedule.config.get("beta_schedule") == "squaredcos_cap_v2"
    timesteps, sigmas = multistep_grid(schedule, steps, opts, "dpmpp_2m", round_karras=not cosine)
    sigmas = np.append(sigmas, final_sigma(schedule, sigmas, opts["final_sigmas_type"], "dpmpp_2m", False))
    order, midpoint = opts["solver_order"], opts["solver_type"] == "midpoint"
    n = len(timesteps)
    pred = schedule.prediction_type
    vp = [vp_from_ve(s) for s in sigmas]
    lam = [log_snr(a, s) for a, s in vp]

    trace = Trace(n)
    x = trace.x_T()
    history: list[np.ndarray] = []  # converted predictions, newest last
    for i, t in enumerate(timesteps):
        out = trace.call(x, t)
        alpha_s, sigma_s = vp[i]
        convert = data_prediction if data_pred else noise_prediction
        history = (history + [convert(out, x, alpha_s, sigma_s, pred)])[-order:]
        step_order = multistep_order(
            i,
            n,
            order,
            last_first_order=(
                opts["euler_at_final"] or (opts["lower_order_final"] and n < 15) or opts["final_sigmas_type"] == "zero"
            ),
            lower_order_final=opts["lower_order_final"],
        )
        alpha_t, sigma_t = vp[i + 1]
        with np.errstate(over="ignore"):
            h = lam[i + 1] - lam[i]
        m0 = history[-1]
        if step_order == 1:
            d1 = d2 = 0.0
        elif step_order == 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1 = (m0 - history[-2]) / r0
            d2 = 0.0
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0, d1_1 = (m0 - history[-2]) / r0, (history[-2] - history[-3]) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
        if data_pred:
            phi = np.expm1(-h)  # e^{-h} − 1
            x = (sigma_t / sigma_s) * x - alpha_t * phi * m0
            if step_order == 2 and midpoint:
                x = x - 0.5 * alpha_t * phi * d1
            elif step_order >= 2:
                x = x + alpha_t * (phi / h + 1.0) * d1
            if step_order == 3:
                x = x - alpha_t * ((phi + h) / h**2 - 0.5) * d2
        else:
            phi = np.expm1(h)  # e^{h} − 1
            x = (alpha_t / alpha_s) * x - sigma_t * phi * m0
            if step_order == 2 and midpoint:
                x = x - 0.5 * sigma_t * phi * d1
            elif step_order >= 2:
                x = x - sigma_t * (phi / h - 1.0) * d1
            if step_order == 3:
                x = x - sigma_t * ((phi - h) / h**2 - 0.5) * d2
    return trace.finish(
        x,
        schedule,
        solver="dpmpp_2m",
        steps=steps,
        options=opts,
        out_sigma=float(sigmas[-1]),
        diffusers_class="DPMSolverMultistepScheduler",
    )
