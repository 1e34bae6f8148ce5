"""UniPC (Zhao et al. 2023): the unified predictor UniP and corrector UniC with B(h) = h (bh1)
or e^h − 1 (bh2), as diffusers' UniPCMultistepScheduler runs them. The corrector refines the
latent a call was made at, using that call's output, before the next predictor step."""

from __future__ import annotations

import numpy as np

from ..schedules import DiscreteSchedule, data_prediction, log_snr, noise_prediction, vp_from_ve
from .common import (
    NONLINEAR,
    SolverError,
    Trace,
    check_steps,
    refuse,
    resolve_options,
)
from .dpmpp import final_sigma, multistep_grid

DEFAULTS = {
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "final_sigmas_type": "zero",
    "thresholding": False,
}


def _unipc_system(h: float, rks: list[float], order: int, predict_x0: bool, bh1: bool):
    """The matrix R of powers of r_k and the vector b whose solution weights the differences
    (UniPC eq. 7/8 with B(h))."""
    hh = -h if predict_x0 else h
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if bh1 else np.expm1(hh)
    rks = np.array(rks + [1.0])
    rows, b = [], []
    factorial = 1
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.array(rows), np.array(b)


def build(schedule: DiscreteSchedule, steps: int, **options):
    """UniPC multistep predictor (UniP-p) with corrector (UniC-p), order 1-3."""
    steps = check_steps("unipc", steps, schedule)
    opts = resolve_options("unipc", schedule, options, DEFAULTS)
    if opts["solver_type"] in ("midpoint", "heun", "logrho"):
        opts["solver_type"] = "bh2"  # diffusers maps DPM-Solver/DEIS names onto bh2
    refuse(
        "unipc",
        opts,
        {
            "solver_type": (("bh1", "bh2"), "expected bh1 or bh2"),
            "solver_order": ((1, 2, 3), "orders 1, 2 and 3 are implemented"),
            "solver_p": (None, "an external predictor scheduler is not supported"),
            "thresholding": (False, f"dynamic thresholding is {NONLINEAR}"),
            "use_exponential_sigmas": (False, "only the default and Karras sigmas are implemented"),
            "use_beta_sigmas": (False, "only the default and Karras sigmas are implemented"),
            "use_flow_sigmas": (False, "flow-matching schedules are not VP schedules"),
        },
    )
    if not opts["predict_x0"] and opts["final_sigmas_type"] == "zero":
        raise SolverError(
            "unipc: predict_x0=False cannot step to σ = 0 (the noise-prediction update divides by "
            "it; diffusers returns NaN there); pass final_sigmas_type='sigma_min'"
        )
    timesteps, sigmas = multistep_grid(schedule, steps, opts, "unipc")
    sigmas = np.append(
        sigmas, final_sigma(schedule, sigmas, opts["final_sigmas_type"], "unipc", bool(opts["use_karras_sigmas"]))
    )
    order, predict_x0, bh1 = opts["solver_order"], bool(opts["predict_x0"]), opts["solver_type"] == "bh1"
    disabled = set(int(i) for i in opts["disable_corrector"])
    n = len(timesteps)
    pred = schedule.prediction_type
    convert = data_prediction if predict_x0 else noise_prediction
    vp = [vp_from_ve(s) for s in sigmas]
    lam = [log_snr(a, s) for a, s in vp]

    def update(base, i_from: int, i_to: int, m0, diffs, rhos, last_term=None):
        """x at i_to from base at i_from: the exponential-integrator step plus B(h)-weighted
        differences (predictor: last_term None; corrector: the new output's difference)."""
        alpha_t, sigma_t = vp[i_to]
        alpha_s, sigma_s = vp[i_from]
        with np.errstate(over="ignore"):
            h = lam[i_to] - lam[i_from]
        hh = -h if predict_x0 else h
        h_phi_1 = np.expm1(hh)
        b_h = hh if bh1 else np.expm1(hh)
        if predict_x0:
            x = (sigma_t / sigma_s) * base - alpha_t * h_phi_1 * m0
            scale = alpha_t * b_h
        else:
            x = (alpha_t / alpha_s) * base - sigma_t * h_phi_1 * m0
            scale = sigma_t * b_h
        residual = sum(r * d for r, d in zip(rhos, diffs))
        if last_term is not None:
            residual = residual + last_term
        # A first-order predictor has no differences: skip the term rather than form B(h)·0,
        # which diffusers evaluates as NaN when bh1 steps to σ = 0 (B(h) = −∞ there).
        if isinstance(residual, np.ndarray):
            x = x - scale * residual
        return x

    trace = Trace(n)
    x = trace.x_T()
    history: list[np.ndarray] = []  # converted predictions, newest last
    last_sample = None
    this_order = 1
    for i, t in enumerate(timesteps):
        out = trace.call(x, t)
        m_new = convert(out, x, *vp[i], pred)
        if i > 0 and (i - 1) not in disabled:
            # UniC: correct the latent this call was made at (from the previous corrected base)
            m0 = history[-1]
            h = lam[i] - lam[i - 1]
            rks, diffs = [], []
            for k in range(1, this_order):
                rk = (lam[i - (k + 1)] - lam[i - 1]) / h
                rks.append(rk)
                diffs.append((history[-(k + 1)] - m0) / rk)
            r_mat, b = _unipc_system(h, rks, this_order, predict_x0, bh1)
            rhos_c = np.array([0.5]) if this_order == 1 else np.linalg.solve(r_mat, b)
            x = update(last_sample, i - 1, i, m0, diffs, rhos_c[:-1], rhos_c[-1] * (m_new - m0))
        history = (history + [m_new])[-order:]
        this_order = min(order, n - i) if opts["lower_order_final"] else order
        this_order = min(this_order, i + 1)
        last_sample = x
        # UniP: predict the next latent
        m0 = history[-1]
        with np.errstate(over="ignore"):
            h = lam[i + 1] - lam[i]
        rks, diffs = [], []
        for k in range(1, this_order):
            rk = (lam[i - k] - lam[i]) / h
            rks.append(rk)
            diffs.append((history[-(k + 1)] - m0) / rk)
        if diffs:
            if this_order == 2:
                rhos_p = [0.5]
            else:
                r_mat, b = _unipc_system(h, rks, this_order, predict_x0, bh1)
                rhos_p = np.linalg.solve(r_mat[:-1, :-1], b[:-1])
        else:
            rhos_p = []
        x = update(x, i, i + 1, m0, diffs, rhos_p)
    return trace.finish(
        x,
        schedule,
        solver="unipc",
        steps=steps,
        options=opts,
        out_sigma=float(sigmas[-1]),
        diffusers_class="UniPCMultistepScheduler",
    )
